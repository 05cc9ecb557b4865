// Argument checks and parameter packing for the rope ops (CPU and CUDA share them).
#include "common/rope.h"

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

}  // namespace

RopeParams make_rope_params(const char* op, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& positions, at::ArrayRef<double> inv_freq,
                            at::IntArrayRef freq_axis, double scale, bool inverse) {
  check_rank(q, 4, op, "q", "(B, S, Hq, D)");
  check_rank(k, 4, op, "k", "(B, S, Hk, D)");
  check_rank(positions, 3, op, "positions", "(A, B, S)");
  const auto dt = q.scalar_type();
  VLMKERN_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                op, "q must be float32, float16, bfloat16 or float64, got ", dt);
  VLMKERN_CHECK(k.scalar_type() == dt, op, "k dtype ", k.scalar_type(), " differs from q dtype ",
                dt);
  const auto pt = positions.scalar_type();
  VLMKERN_CHECK(pt == at::kInt || pt == at::kLong, op, "positions must be int32 or int64, got ",
                pt);
  VLMKERN_CHECK(k.device() == q.device() && positions.device() == q.device(), op,
                "q, k and positions must be on one device, got q on ", q.device(), ", k on ",
                k.device(), ", positions on ", positions.device());
  const int64_t b = q.size(0), s = q.size(1), d = q.size(3);
  VLMKERN_CHECK(k.size(0) == b && k.size(1) == s && k.size(3) == d, op, "k shape ", k.sizes(),
                " does not match q shape ", q.sizes(), " in B, S or D");
  VLMKERN_CHECK(positions.size(1) == b && positions.size(2) == s, op, "positions shape ",
                positions.sizes(), " must be (A, ", b, ", ", s, ") to match q");
  const int64_t axes = positions.size(0);
  VLMKERN_CHECK(axes >= 1 && axes <= 127, op, "positions must have 1..127 axes, got ", axes);
  const int64_t half = static_cast<int64_t>(inv_freq.size());
  VLMKERN_CHECK(half >= 1 && half <= kMaxRopeFreqs, op, "inv_freq must have 1..", kMaxRopeFreqs,
                " entries, got ", half);
  VLMKERN_CHECK(2 * half <= d, op, "rotary_dim = 2 * len(inv_freq) = ", 2 * half,
                " exceeds head dim D=", d);
  VLMKERN_CHECK(static_cast<int64_t>(freq_axis.size()) == half, op, "freq_axis has ",
                freq_axis.size(), " entries but inv_freq has ", half);
  VLMKERN_CHECK(q.size(2) <= INT32_MAX && k.size(2) <= INT32_MAX && d <= INT32_MAX, op,
                "head counts and D must fit in int32");

  RopeParams p;
  p.q_in = q.const_data_ptr();
  p.k_in = k.const_data_ptr();
  for (int i = 0; i < 4; ++i) {
    p.q_in_stride[i] = q.stride(i);
    p.k_in_stride[i] = k.stride(i);
  }
  for (int i = 0; i < 3; ++i) p.pos_stride[i] = positions.stride(i);
  p.batch = b;
  p.seq = s;
  p.heads_q = static_cast<int>(q.size(2));
  p.heads_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(d);
  p.rotary_dim = static_cast<int>(2 * half);
  p.positions = positions.const_data_ptr();
  p.positions_int64 = pt == at::kLong;
  p.dtype = rope_dtype(dt);
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
