// Argument checks and parameter packing for the rope ops (CPU and CUDA share them).
#include "common/rope.h"

#include <ATen/MemoryOverlap.h>

#include "common/checks.h"

namespace vlmkern {
namespace {

RopeDtype rope_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return RopeDtype::kFloat32;
    case at::kHalf: return RopeDtype::kFloat16;
    case at::kBFloat16: return RopeDtype::kBFloat16;
    default: return RopeDtype::kFloat64;
  }
}

// Checks q (B, S, Hq, D) and k (B, S, Hk, D) and packs them.
RopeParams qk_params(const char* op, const at::Tensor& q, const at::Tensor& k) {
  check_rank(q, 4, op, "q", "(B, S, Hq, D)");
  check_rank(k, 4, op, "k", "(B, S, Hk, D)");
  const auto dt = q.scalar_type();
  VLMKERN_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                op, "q must be float32, float16, bfloat16 or float64, got ", dt);
  VLMKERN_CHECK(k.scalar_type() == dt, op, "k dtype ", k.scalar_type(), " differs from q dtype ",
                dt);
  VLMKERN_CHECK(k.device() == q.device(), op, "q and k must be on one device, got q on ",
                q.device(), ", k on ", k.device());
  const int64_t b = q.size(0), s = q.size(1), d = q.size(3);
  VLMKERN_CHECK(k.size(0) == b && k.size(1) == s && k.size(3) == d, op, "k shape ", k.sizes(),
                " does not match q shape ", q.sizes(), " in B, S or D");
  VLMKERN_CHECK((q.size(2) + k.size(2)) * d <= INT32_MAX, op,
                "one token's q and k heads hold (Hq + Hk) * D = ", (q.size(2) + k.size(2)) * d,
                " elements; at most 2^31 - 1 are supported");
  RopeParams p;
  p.q_in = q.const_data_ptr();
  p.k_in = k.const_data_ptr();
  for (int i = 0; i < 4; ++i) {
    p.q_in_stride[i] = q.stride(i);
    p.k_in_stride[i] = k.stride(i);
  }
  p.batch = b;
  p.seq = s;
  p.heads_q = static_cast<int>(q.size(2));
  p.heads_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(d);
  p.dtype = rope_dtype(dt);
  return p;
}

}  // namespace

RopeParams make_rope_params(const char* op, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& positions, at::ArrayRef<double> inv_freq,
                            at::IntArrayRef freq_axis, double scale, bool inverse) {
  RopeParams p = qk_params(op, q, k);
  check_rank(positions, 3, op, "positions", "(A, B, S)");
  const auto pt = positions.scalar_type();
  VLMKERN_CHECK(pt == at::kInt || pt == at::kLong, op, "positions must be int32 or int64, got ",
                pt);
  VLMKERN_CHECK(positions.device() == q.device(), op,
                "positions must be on the device of q, got q on ", q.device(),
                ", positions on ", positions.device());
  VLMKERN_CHECK(positions.size(1) == p.batch && positions.size(2) == p.seq, op,
                "positions shape ", positions.sizes(), " must be (A, ", p.batch, ", ", p.seq,
                ") to match q");
  const int64_t axes = positions.size(0);
  VLMKERN_CHECK(axes >= 1 && axes <= 127, op, "positions must have 1..127 axes, got ", axes);
  const int64_t half = static_cast<int64_t>(inv_freq.size());
  VLMKERN_CHECK(half >= 1 && half <= kMaxRopeFreqs, op, "inv_freq must have 1..", kMaxRopeFreqs,
                " entries, got ", half);
  VLMKERN_CHECK(2 * half <= p.head_dim, op, "rotary_dim = 2 * len(inv_freq) = ", 2 * half,
                " exceeds head dim D=", p.head_dim);
  VLMKERN_CHECK(static_cast<int64_t>(freq_axis.size()) == half, op, "freq_axis has ",
                freq_axis.size(), " entries but inv_freq has ", half);
  for (int i = 0; i < 3; ++i) p.pos_stride[i] = positions.stride(i);
  p.rotary_dim = static_cast<int>(2 * half);
  p.positions = positions.const_data_ptr();
  p.positions_int64 = pt == at::kLong;
  p.scale = static_cast<float>(scale);
  p.inverse = inverse;
  for (int64_t f = 0; f < half; ++f) {
    VLMKERN_CHECK(freq_axis[f] >= 0 && freq_axis[f] < axes, op, "freq_axis[", f, "] = ",
                  freq_axis[f], " is not a valid axis of positions (A=", axes, ")");
    p.inv_freq[f] = static_cast<float>(inv_freq[f]);  // HF's inv_freq is fp32: exact round trip
    p.freq_axis[f] = static_cast<int8_t>(freq_axis[f]);
  }
  return p;
}

RopeParams make_rope_cos_sin_params(const char* op, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  RopeParams p = qk_params(op, q, k);
  check_rank(cos, 3, op, "cos", "(B, S, R)");
  check_rank(sin, 3, op, "sin", "(B, S, R)");
  const auto dt = cos.scalar_type();
  VLMKERN_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                op, "cos must be float32, float16, bfloat16 or float64, got ", dt);
  VLMKERN_CHECK(sin.scalar_type() == dt, op, "sin dtype ", sin.scalar_type(),
                " differs from cos dtype ", dt);
  VLMKERN_CHECK(cos.device() == q.device() && sin.device() == q.device(), op,
                "cos and sin must be on the device of q, got q on ", q.device(), ", cos on ",
                cos.device(), ", sin on ", sin.device());
  VLMKERN_CHECK(cos.sizes() == sin.sizes(), op, "cos shape ", cos.sizes(), " differs from sin ",
                sin.sizes());
  VLMKERN_CHECK((cos.size(0) == p.batch || cos.size(0) == 1) && cos.size(1) == p.seq, op,
                "cos shape ", cos.sizes(), " must be (", p.batch, " or 1, ", p.seq, ", R)");
  const int64_t r = cos.size(2);
  VLMKERN_CHECK(r >= 2 && r % 2 == 0 && r <= p.head_dim && r <= 2 * kMaxRopeFreqs, op,
                "cos last dim R=", r, " must be even, in [2, min(D=", p.head_dim, ", ",
                2 * kMaxRopeFreqs, ")]");
  p.rotary_dim = static_cast<int>(r);
  p.inverse = inverse;
  p.cos_sin_input = true;
  p.cos = cos.const_data_ptr();
  p.sin = sin.const_data_ptr();
  p.cos_sin_dtype = rope_dtype(dt);
  for (int i = 0; i < 3; ++i) {
    p.cos_stride[i] = cos.size(i) == 1 ? 0 : cos.stride(i);
    p.sin_stride[i] = sin.size(i) == 1 ? 0 : sin.stride(i);
  }
  return p;
}

void check_rope_inplace_targets(const at::Tensor& q, const at::Tensor& k) {
  VLMKERN_CHECK(at::has_internal_overlap(q) != at::MemOverlap::Yes, "rope_",
                "q has elements that share memory (e.g. expanded); rotating it in place would "
                "rotate them once per alias: pass q.contiguous() or use the out-of-place op");
  VLMKERN_CHECK(at::has_internal_overlap(k) != at::MemOverlap::Yes, "rope_",
                "k has elements that share memory (e.g. expanded); rotating it in place would "
                "rotate them once per alias: pass k.contiguous() or use the out-of-place op");
  const auto status = at::get_overlap_status(q, k);
  VLMKERN_CHECK(status == at::MemOverlapStatus::No || status == at::MemOverlapStatus::TooHard,
                "rope_", "q and k overlap in memory; rotate them out of place");
}

void set_rope_outputs(RopeParams& p, const at::Tensor& q_out, const at::Tensor& k_out) {
  p.q_out = q_out.mutable_data_ptr();
  p.k_out = k_out.mutable_data_ptr();
  for (int i = 0; i < 4; ++i) {
    p.q_out_stride[i] = q_out.stride(i);
    p.k_out_stride[i] = k_out.stride(i);
  }
  p.copy_rest = p.q_out != p.q_in || p.k_out != p.k_in;
}

}  // namespace vlmkern
