// Packed-mode patch embedding (Qwen2-VL / 2.5-VL / 3-VL pre-patchified rows + grid_thw): one GEMM
// with the bias, Qwen3-VL's bilinear (align_corners=True) position table resampled per image in
// spatial-merge-block order (a row loop on the CPU, ATen ops elsewhere), cu_seqlens computed on the
// input's device (no host sync); backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>

#include <cmath>

#include "common/patch_embed.h"
#include "common/patch_embed_detail.h"

namespace vlmkern {
namespace {

using namespace patch_embed_detail;
constexpr const char* kOp = "patch_embed";

struct PackedGeom {
  int64_t n, k, c, d, images, s;
};

PackedGeom check_packed(const at::Tensor& patches, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& grid_thw,
                        const std::optional<at::Tensor>& pos_embed, int64_t merge,
                        const PixelNorm& norm) {
  check_rank(patches, 2, kOp, "patches", "(N, C*T*P*P)");
  check_rank(weight, 5, kOp, "weight", "(D, C, T, P, P)");
  check_dtype_device(kOp, patches, "patches", weight);
  PackedGeom g{};
  g.n = patches.size(0);
  g.c = weight.size(1);
  g.d = weight.size(0);
  const int64_t t = weight.size(2), p = weight.size(3);
  VLMKERN_CHECK(p >= 1 && t >= 1 && g.c >= 1 && weight.size(4) == p, kOp,
                "weight must be (D, C, T, P, P) with C, T, P >= 1, got shape ", weight.sizes());
  g.k = g.c * t * p * p;
  VLMKERN_CHECK(patches.size(1) == g.k, kOp, "patches has ", patches.size(1),
                " values per row but weight needs C*T*P*P=", g.k);
  check_rank(grid_thw, 2, kOp, "grid_thw", "(n, 3)");
  VLMKERN_CHECK(grid_thw.size(1) == 3, kOp, "grid_thw must have 3 columns (t, h, w), got shape ",
                grid_thw.sizes());
  VLMKERN_CHECK(grid_thw.scalar_type() == at::kInt || grid_thw.scalar_type() == at::kLong, kOp,
                "grid_thw must be int32 or int64, got ", dtype_name(grid_thw.scalar_type()));
  VLMKERN_CHECK(grid_thw.device() == patches.device(), kOp, "grid_thw is on ", grid_thw.device(),
                " but patches is on ", patches.device());
  g.images = grid_thw.size(0);
  VLMKERN_CHECK(g.n == 0 || g.images >= 1, kOp, "grid_thw has no rows but patches has N=", g.n);
  VLMKERN_CHECK(merge >= 1, kOp, "spatial_merge_size must be >= 1, got ", merge);
  check_param(kOp, bias, "bias", 1, "(D,)", weight);
  check_param(kOp, pos_embed, "pos_embed", 2, "(S*S, D)", weight);
  check_norm(kOp, norm, g.c);
  if (pos_embed) {
    const int64_t rows = pos_embed->size(0);
    int64_t s = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(rows))));
    while (s * s > rows) --s;
    while ((s + 1) * (s + 1) <= rows) ++s;
    VLMKERN_CHECK(rows >= 1 && s * s == rows, kOp, "pos_embed has ", rows,
                  " rows: not a square S*S table");
    g.s = s;
  }
  return g;
}

// Host-side validation of grid_thw's values (CPU tensors only: CUDA never syncs for them).
void check_grid_values(const at::Tensor& grid_thw, const PackedGeom& g, int64_t merge,
                       bool has_pos) {
  const at::Tensor grid = grid_thw.to(at::kLong).contiguous();
  const int64_t* v = grid.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t i = 0; i < g.images; ++i) {
    const int64_t t = v[3 * i], h = v[3 * i + 1], w = v[3 * i + 2];
    VLMKERN_CHECK(t >= 1 && h >= 1 && w >= 1, kOp, "grid_thw row ", i, " = (", t, ", ", h, ", ",
                  w, ") must be positive");
    VLMKERN_CHECK(!has_pos || (h % merge == 0 && w % merge == 0), kOp, "grid_thw row ", i,
                  ": h=", h, ", w=", w, " are not divisible by spatial_merge_size=", merge);
    total += t * h * w;
  }
  VLMKERN_CHECK(total == g.n, kOp, "grid_thw covers ", total, " patches but patches has N=", g.n,
                " rows");
}

// (n + 1,) int64 prefix sums of t*h*w, on grid_thw's device.
at::Tensor prefix_counts(const at::Tensor& grid_thw) {
  const at::Tensor grid = grid_thw.to(at::kLong);
  const at::Tensor counts = grid.select(1, 0) * grid.select(1, 1) * grid.select(1, 2);
  at::Tensor cu = at::zeros({grid.size(0) + 1}, grid.options());
  cu.narrow(0, 1, grid.size(0)).copy_(counts.cumsum(0));
  return cu;
}

// For each of the N rows, the 4 bilinear taps (index into the S*S table) and their fp32 weights,
// computed as transformers' get_vision_interpolation_indices_and_weights does (bilinear,
// align_corners=True, merge-block order), tap order (h0 w0, h0 w1, h1 w0, h1 w1).
struct Taps {
  at::Tensor index[4];
  at::Tensor weight[4];
};

Taps bilinear_taps(const at::Tensor& grid_thw, int64_t n, int64_t s, int64_t m) {
  const at::Tensor grid = grid_thw.to(at::kLong);
  const at::Tensor cu = prefix_counts(grid_thw);
  const int64_t images = grid.size(0);
  const at::Tensor rows = at::arange(n, grid.options());
  const at::Tensor img =
      at::searchsorted(cu.narrow(0, 1, images), rows, false, /*right=*/true).clamp_max(images - 1);
  const at::Tensor h = grid.select(1, 1).index_select(0, img);
  const at::Tensor w = grid.select(1, 2).index_select(0, img);
  const at::Tensor within = (rows - cu.index_select(0, img)).remainder((h * w).clamp_min(1));
  const at::Tensor blocks_w = w.div(m, "floor").clamp_min(1);
  const at::Tensor row =
      within.div(blocks_w * (m * m), "floor") * m + within.div(m, "floor").remainder(m);
  const at::Tensor col = within.div(m * m, "floor").remainder(blocks_w) * m + within.remainder(m);
  at::Tensor taps[2][2], weights[2][2];
  const at::Tensor coord[2] = {row, col}, size[2] = {h, w};
  for (int axis = 0; axis < 2; ++axis) {
    const at::Tensor src = coord[axis].to(at::kFloat).mul(s - 1).div((size[axis] - 1).clamp_min(1));
    const at::Tensor fl = src.floor();
    const at::Tensor base = fl.to(at::kLong);
    for (int o = 0; o < 2; ++o) {
      taps[axis][o] = (base + o).clamp(0, s - 1);
      weights[axis][o] = (1 - (src - fl - o).abs()).clamp_min(0);
    }
  }
  Taps out;
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      out.index[2 * i + j] = taps[0][i] * s + taps[1][j];
      out.weight[2 * i + j] = weights[0][i] * weights[1][j];
    }
  }
  return out;
}

at::ScalarType accum_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// CPU: tokens[r] += dtype(sum_k table[idx_k[r]] * w_k[r]), the taps summed in fp32 (fp64 for
// double) in tap order and rounded before the add, as HF's (embedding * weights).sum(1).to(dtype)
// then hidden + pos; one pass over the rows instead of 4 gathered (N, D) temporaries.
void add_positions_cpu(const at::Tensor& tokens, const at::Tensor& table, const Taps& taps) {
  const int64_t n = tokens.size(0), d = tokens.size(1);
  at::Tensor idx[4], wts[4];
  for (int k = 0; k < 4; ++k) {
    idx[k] = taps.index[k].contiguous();
    wts[k] = taps.weight[k].to(at::kFloat).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(),
                                  "patch_embed_positions", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* tab = table.const_data_ptr<scalar_t>();
    scalar_t* out = tokens.mutable_data_ptr<scalar_t>();
    const int64_t* ix[4];
    const float* wx[4];
    for (int k = 0; k < 4; ++k) {
      ix[k] = idx[k].const_data_ptr<int64_t>();
      wx[k] = wts[k].const_data_ptr<float>();
    }
    at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* row[4];
        acc_t w[4];
        for (int k = 0; k < 4; ++k) {
          row[k] = tab + ix[k][r] * d;
          w[k] = static_cast<acc_t>(wx[k][r]);
        }
        scalar_t* o = out + r * d;
        for (int64_t j = 0; j < d; ++j) {
          acc_t p = static_cast<acc_t>(row[0][j]) * w[0];
          p += static_cast<acc_t>(row[1][j]) * w[1];
          p += static_cast<acc_t>(row[2][j]) * w[2];
          p += static_cast<acc_t>(row[3][j]) * w[3];
          o[j] = static_cast<scalar_t>(static_cast<acc_t>(o[j]) +
                                       static_cast<acc_t>(static_cast<scalar_t>(p)));
        }
      }
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> patch_embed_packed_forward(
    const at::Tensor& patches, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& grid_thw, const std::optional<at::Tensor>& pos_embed,
    int64_t spatial_merge_size, const PixelNorm& norm, bool check_grid) {
  const PackedGeom g =
      check_packed(patches, weight, bias, grid_thw, pos_embed, spatial_merge_size, norm);
  if (check_grid) check_grid_values(grid_thw, g, spatial_merge_size, pos_embed.has_value());
  const at::Tensor cu_seqlens = prefix_counts(grid_thw).to(at::kInt);
  const auto [w2, b2] = fold_weight(weight, bias, norm);
  const at::Tensor x = patches.to(weight.scalar_type());
  const bool positions = pos_embed && g.n > 0 && g.d > 0;
  const Taps taps =
      positions ? bilinear_taps(grid_thw, g.n, g.s, spatial_merge_size) : Taps{};
  const PositionRowsFn position_rows = cuda_position_rows_hook();
  if (positions && x.is_cuda() && position_rows != nullptr && x.scalar_type() != at::kDouble) {
    const at::Tensor index = at::stack(taps.index);                  // (4, N) int64
    const at::Tensor tap_w = at::stack(taps.weight).to(at::kFloat);  // (4, N) fp32
    const at::Tensor table = pos_embed->contiguous();                // (S*S, D)
    // CUDA, VLMKERN_PATCH_EMBED_GEMM=implicit: one GEMM, the positions + bias in its epilogue.
    const PositionGemmFn position_gemm = cuda_position_gemm_hook();
    at::Tensor tokens = at::empty({g.n, g.d}, x.options());  // (N, D)
    if (position_gemm != nullptr && position_gemm(tokens, x, w2, table, index, tap_w, b2)) {
      return {tokens, cu_seqlens};
    }
    // CUDA: the (N, D) position + bias addend in one kernel, then the GEMM with it as C.
    at::Tensor addend = at::empty({g.n, g.d}, x.options());  // (N, D)
    if (position_rows(table, index, tap_w, b2, addend)) {
      addend_gemm(tokens.unsqueeze(0), x.unsqueeze(0), w2, addend);
      return {tokens, cu_seqlens};
    }
  }
  at::Tensor tokens = b2.defined() ? at::addmm(b2, x, w2.t()) : at::mm(x, w2.t());
  if (positions) {
    if (tokens.is_cpu()) {
      add_positions_cpu(tokens, pos_embed->contiguous(), taps);
    } else {  // + sum_k table[idx_k] * w_k in fp32 (one table conversion), cast, added
      const at::Tensor table = pos_embed->to(accum_type(*pos_embed));
      at::Tensor pos;
      for (int k = 0; k < 4; ++k) {
        at::Tensor gathered = table.index_select(0, taps.index[k]);
        const at::Tensor w = taps.weight[k].to(table.scalar_type()).unsqueeze(1);
        pos = k == 0 ? gathered.mul_(w) : pos.addcmul_(gathered, w);
      }
      tokens.add_(pos.to(weight.scalar_type()));
    }
  }
  return {tokens, cu_seqlens};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_packed_backward(
    const at::Tensor& grad, const at::Tensor& patches, const at::Tensor& weight, bool has_bias,
    const at::Tensor& grid_thw, const std::optional<at::Tensor>& pos_embed,
    int64_t spatial_merge_size, const PixelNorm& norm, std::array<bool, 4> output_mask) {
  const PackedGeom g =
      check_packed(patches, weight, std::nullopt, grid_thw, pos_embed, spatial_merge_size, norm);
  check_rank(grad, 2, kOp, "grad", "(N, D)");
  VLMKERN_CHECK(grad.size(0) == g.n && grad.size(1) == g.d, kOp, "grad must have shape [", g.n,
                ", ", g.d, "], got ", grad.sizes());
  VLMKERN_CHECK(grad.scalar_type() == weight.scalar_type() && grad.device() == weight.device(),
                kOp, "grad must be ", dtype_name(weight.scalar_type()), " on ", weight.device());
  VLMKERN_CHECK(!output_mask[0] || patches.scalar_type() != at::kByte, kOp,
                "patches is uint8: it has no gradient");
  at::Tensor d_patches = no_grad_output(patches), d_weight = no_grad_output(weight);
  at::Tensor d_bias = no_grad_output(weight), d_pos = no_grad_output(weight);
  if (output_mask[0]) d_patches = at::mm(grad, fold_weight(weight, std::nullopt, norm).first);
  if (output_mask[1]) {
    at::Tensor x = patches.to(weight.scalar_type());
    if (norm.active()) x = normalize_rows(x.reshape({g.n, g.c, g.k / g.c}), norm, 1);
    d_weight = at::mm(grad.t(), x.reshape({g.n, g.k})).view(weight.sizes());
  }
  if (output_mask[2] && has_bias) d_bias = grad.sum(0);
  if (output_mask[3] && pos_embed) {
    at::Tensor acc = at::zeros({g.s * g.s, g.d}, grad.options().dtype(accum_type(grad)));
    if (g.n > 0 && g.d > 0) {
      const Taps taps = bilinear_taps(grid_thw, g.n, g.s, spatial_merge_size);
      const at::Tensor gf = grad.to(acc.scalar_type());
      for (int k = 0; k < 4; ++k) {
        acc.index_add_(0, taps.index[k], gf * taps.weight[k].to(acc.scalar_type()).unsqueeze(1));
      }
    }
    d_pos = acc.to(weight.scalar_type());
  }
  return {d_patches, d_weight, d_bias, d_pos};
}

}  // namespace vlmkern
