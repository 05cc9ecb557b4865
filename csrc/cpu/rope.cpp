// CPU implementations of the RoPE ops: rope (out of place), rope_ (in place), rope_backward
// (rotation by -angle) and rope_cos_sin(_backward) (HF's given cos/sin). Parallel over token
// tiles; angles in fp32 as HF, their cos/sin by ATen's vectorized kernels (as HF's freqs.cos()).
#include <ATen/Parallel.h>
#include <ATen/ops/cos.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sin.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#include "common/rope.h"
#include "ops.h"

namespace vlmkern {
namespace {

// Tokens per task tile: their cos/sin (2 x kTokenTile x R floats) stay in L1/L2 while every
// head streams through its kTokenTile consecutive rows.
constexpr int64_t kTokenTile = 32;

// Rotates `heads` heads of tokens [t0, t0 + n); cs/sn hold (n, R) cos/sin of those tokens.
template <typename T>
void rotate_heads(const RopeParams& p, const T* in, T* out, const int64_t* in_st,
                  const int64_t* out_st, int heads, int64_t t0, int64_t n, const float* cs_tile,
                  const float* sn_tile) {
  // fp32 math (fp64 for fp64 inputs, so gradcheck sees a linear map at full precision).
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int half = p.rotary_dim / 2;
  Acc row[2 * kMaxRopeFreqs];  // (R,) the head's rotary dims, read before any write (in place)
  // Walk the tile in memory order: head-major when a head's rows are adjacent ((B, H, S, D)),
  // token-major when a token's heads are ((B, S, H, D) or packed).
  const bool head_major = in_st[1] < in_st[2];
  for (int64_t it = 0; it < heads * n; ++it) {
    const int64_t h = head_major ? it / n : it % heads;
    const int64_t i = head_major ? it % n : it / heads;
    const int64_t b = (t0 + i) / p.seq, s = (t0 + i) - b * p.seq;
    const float* cs = cs_tile + i * p.rotary_dim;
    const float* sn = sn_tile + i * p.rotary_dim;
    const T* x = in + b * in_st[0] + s * in_st[1] + h * in_st[2];
    T* y = out + b * out_st[0] + s * out_st[1] + h * out_st[2];
    const int64_t xd = in_st[3], yd = out_st[3];
    if (xd == 1) {
      for (int i = 0; i < p.rotary_dim; ++i) row[i] = static_cast<Acc>(x[i]);
    } else {
      for (int i = 0; i < p.rotary_dim; ++i) row[i] = static_cast<Acc>(x[i * xd]);
    }
    // x*cos + rotate_half(x)*sin: two rounded products, then a rounded sum (as HF). Unit-stride
    // loops over `row` so the compiler vectorizes them.
    if (yd == 1) {
      for (int f = 0; f < half; ++f) y[f] = static_cast<T>(row[f] * cs[f] - row[f + half] * sn[f]);
      for (int f = 0; f < half; ++f) {
        y[f + half] = static_cast<T>(row[f + half] * cs[f + half] + row[f] * sn[f + half]);
      }
    } else {
      for (int f = 0; f < half; ++f) {
        y[f * yd] = static_cast<T>(row[f] * cs[f] - row[f + half] * sn[f]);
        y[(f + half) * yd] = static_cast<T>(row[f + half] * cs[f + half] + row[f] * sn[f + half]);
      }
    }
    if (p.copy_rest) {
      for (int d = p.rotary_dim; d < p.head_dim; ++d) y[d * yd] = x[d * xd];
    }
  }
}

// The token's (R,) cos/sin; for the backward (p.inverse) sin is negated with its halves swapped.
// Table mode reads cos/sin of the token's angles from `cos_row` / `sin_row` (R/2 each).
void token_cos_sin(const RopeParams& p, int64_t b, int64_t s, const float* cos_row,
                   const float* sin_row, float* cs, float* sn) {
  const int half = p.rotary_dim / 2;
  if (p.cos_sin_input) {
    for (int i = 0; i < p.rotary_dim; ++i) {
      cs[i] = rope_load_float(p.cos, p.cos_sin_dtype,
                              b * p.cos_stride[0] + s * p.cos_stride[1] + i * p.cos_stride[2]);
      const float v = rope_load_float(
          p.sin, p.cos_sin_dtype, b * p.sin_stride[0] + s * p.sin_stride[1] + i * p.sin_stride[2]);
      if (p.inverse) {
        sn[i < half ? i + half : i - half] = -v;
      } else {
        sn[i] = v;
      }
    }
    return;
  }
  for (int f = 0; f < half; ++f) {
    const float c = cos_row[f] * p.scale;
    const float v = (p.inverse ? -sin_row[f] : sin_row[f]) * p.scale;
    cs[f] = cs[f + half] = c;
    sn[f] = sn[f + half] = v;
  }
}

// Tokens whose angles are turned into cos/sin by one pair of ATen calls (vectorized, as HF's own
// freqs.cos() / freqs.sin()): (kAngleBlock, R/2) fp32, a few hundred KB.
constexpr int64_t kAngleBlock = 32 * kTokenTile;

// cos and sin (n, R/2) of the angles float(pos) * inv_freq[f] (fp32, as HF) of tokens t0..t0+n.
std::pair<at::Tensor, at::Tensor> angle_cos_sin(const RopeParams& p, int64_t t0, int64_t n) {
  const int half = p.rotary_dim / 2;
  at::Tensor angles = at::empty({n, half}, at::TensorOptions().dtype(at::kFloat));
  float* a = angles.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = (t0 + i) / p.seq, s = (t0 + i) - b * p.seq;
    for (int f = 0; f < half; ++f) {
      const int64_t off = p.freq_axis[f] * p.pos_stride[0] + b * p.pos_stride[1] +
                          s * p.pos_stride[2];
      const int64_t pos = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[off]
                                            : static_cast<const int32_t*>(p.positions)[off];
      a[i * half + f] = static_cast<float>(pos) * p.inv_freq[f];
    }
  }
  return {at::cos(angles), at::sin(angles)};
}

template <typename T>
void rope_cpu_kernel(const RopeParams& p) {
  const int64_t tokens = p.batch * p.seq;
  const int64_t tiles = (tokens + kTokenTile - 1) / kTokenTile;
  const int64_t work_per_tile =
      kTokenTile * (int64_t{p.heads_q + p.heads_k} * p.head_dim + 4 * p.rotary_dim);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(work_per_tile, 1));
  const int half = p.rotary_dim / 2;
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> cs(kTokenTile * p.rotary_dim), sn(kTokenTile * p.rotary_dim);
    at::Tensor block_cos, block_sin;  // (block_n, R/2) for tokens block_t0 .. block_t0 + block_n
    int64_t block_t0 = 0, block_n = 0;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * kTokenTile, n = std::min(kTokenTile, tokens - t0);
      if (!p.cos_sin_input && t0 + n > block_t0 + block_n) {
        block_t0 = t0;
        block_n = std::min({kAngleBlock, end * kTokenTile - t0, tokens - t0});
        std::tie(block_cos, block_sin) = angle_cos_sin(p, block_t0, block_n);
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = (t0 + i) / p.seq, s = (t0 + i) - b * p.seq;
        const int64_t row = (t0 + i - block_t0) * half;
        token_cos_sin(p, b, s, p.cos_sin_input ? nullptr : block_cos.const_data_ptr<float>() + row,
                      p.cos_sin_input ? nullptr : block_sin.const_data_ptr<float>() + row,
                      cs.data() + i * p.rotary_dim, sn.data() + i * p.rotary_dim);
      }
      rotate_heads<T>(p, static_cast<const T*>(p.q_in), static_cast<T*>(p.q_out), p.q_in_stride,
                      p.q_out_stride, p.heads_q, t0, n, cs.data(), sn.data());
      rotate_heads<T>(p, static_cast<const T*>(p.k_in), static_cast<T*>(p.k_out), p.k_in_stride,
                      p.k_out_stride, p.heads_k, t0, n, cs.data(), sn.data());
    }
  });
}

struct CpuRope {
  static void run(const RopeParams& p, const at::Tensor&) {
    if (p.batch * p.seq == 0) return;
    switch (p.dtype) {
      case RopeDtype::kFloat32: return rope_cpu_kernel<float>(p);
      case RopeDtype::kFloat16: return rope_cpu_kernel<c10::Half>(p);
      case RopeDtype::kBFloat16: return rope_cpu_kernel<c10::BFloat16>(p);
      case RopeDtype::kFloat64: return rope_cpu_kernel<double>(p);
    }
  }
};
using Impl = RopeImpl<CpuRope>;

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& positions,
                                            at::ArrayRef<double> inv_freq,
                                            at::IntArrayRef freq_axis, double scale) {
  return Impl::rope(q, k, positions, inv_freq, freq_axis, scale, false);
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cpu(const at::Tensor& grad_q,
                                                     const at::Tensor& grad_k,
                                                     const at::Tensor& positions,
                                                     at::ArrayRef<double> inv_freq,
                                                     at::IntArrayRef freq_axis, double scale) {
  return Impl::rope(grad_q, grad_k, positions, inv_freq, freq_axis, scale, true);
}

std::tuple<at::Tensor, at::Tensor> rope_cos_sin_cpu(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& cos, const at::Tensor& sin,
                                                    bool inverse) {
  return Impl::cos_sin(q, k, cos, sin, inverse);
}

void rope_inplace_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                      at::ArrayRef<double> inv_freq, at::IntArrayRef freq_axis, double scale) {
  Impl::in_place(q, k, positions, inv_freq, freq_axis, scale);
}

TORCH_LIBRARY_IMPL(vlmkern, CPU, m) {
  m.impl("rope", &rope_cpu);
  m.impl("rope_backward", &rope_backward_cpu);
  m.impl("rope_", &rope_inplace_cpu);
  m.impl("rope_cos_sin", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                            const at::Tensor& sin) {
    return rope_cos_sin_cpu(q, k, cos, sin, false);
  });
  m.impl("rope_cos_sin_backward", [](const at::Tensor& gq, const at::Tensor& gk,
                                     const at::Tensor& cos, const at::Tensor& sin) {
    return rope_cos_sin_cpu(gq, gk, cos, sin, true);
  });
}

}  // namespace vlmkern
