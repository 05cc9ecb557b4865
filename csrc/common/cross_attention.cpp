// Argument checks for cross_attention / cross_attention_backward / mllama_kv_ranges, shared by
// CPU and CUDA: only what metadata can tell (no reads of index values, so no host sync).
#include "common/cross_attention.h"

#include <cmath>
#include <vector>

#include "common/checks.h"

namespace vlmkern {
namespace {

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// An optional index tensor: int32/int64, on q's device, of the given rank.
XattnIndex index_arg(const char* op, const at::Tensor& t, const at::Tensor& q, const char* name,
                     int64_t rank, const char* layout) {
  check_rank(t, rank, op, name, layout);
  VLMKERN_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, name,
                " must be int32 or int64, got ", t.scalar_type());
  VLMKERN_CHECK(t.device() == q.device(), op, name, " must be on the device of q, got q on ",
                q.device(), ", ", name, " on ", t.device());
  XattnIndex ix;
  ix.data = t.const_data_ptr();
  ix.is64 = t.scalar_type() == at::kLong;
  for (int64_t i = 0; i < rank; ++i) ix.stride[i] = t.stride(i);
  return ix;
}

}  // namespace

XattnParams make_xattn_params(const char* op, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const std::optional<at::Tensor>& kv_ranges,
                              const std::optional<at::Tensor>& cu_seqlens_q,
                              const std::optional<at::Tensor>& cu_seqlens_k,
                              const std::optional<at::Tensor>& prefix_len,
                              std::optional<double> scale, std::string_view masked_rows) {
  check_rank(q, 4, op, "q", "(B, Sq, Hq, D)");
  check_rank(k, 4, op, "k", "(B, Sk, Hk, D)");
  check_rank(v, 4, op, "v", "(B, Sk, Hk, D)");
  const auto dt = q.scalar_type();
  VLMKERN_CHECK(is_float(dt), op, "q must be float32, float16, bfloat16 or float64, got ", dt);
  VLMKERN_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, "k and v must have q's dtype ",
                dt, ", got k ", k.scalar_type(), ", v ", v.scalar_type());
  VLMKERN_CHECK(k.device() == q.device() && v.device() == q.device(), op,
                "q, k and v must be on one device, got q on ", q.device(), ", k on ", k.device(),
                ", v on ", v.device());
  VLMKERN_CHECK(v.sizes() == k.sizes(), op, "v shape ", v.sizes(), " differs from k shape ",
                k.sizes());
  VLMKERN_CHECK(k.size(0) == q.size(0), op, "k batch ", k.size(0), " differs from q batch ",
                q.size(0), " (expand shared queries or keys to the batch)");
  const int64_t d = q.size(3);
  VLMKERN_CHECK(k.size(3) == d, op, "k head dim ", k.size(3), " differs from q head dim ", d);
  VLMKERN_CHECK(d >= 1 && d <= kXattnMaxHeadDim, op, "head dim D=", d,
                " is not supported: D must be in [1, ", kXattnMaxHeadDim, "]");
  VLMKERN_CHECK(k.size(1) <= INT32_MAX, op, "k has ", k.size(1),
                " keys; key positions (kv_ranges, blocks) must fit in int32");
  const int64_t hq = q.size(2), hk = k.size(2);
  VLMKERN_CHECK(hk >= 1 && hq % hk == 0, op, "q heads Hq=", hq,
                " must be a multiple of k/v heads Hk=", hk, " (GQA/MQA)");
  VLMKERN_CHECK(masked_rows == "zero" || masked_rows == "uniform", op,
                "masked_rows must be 'zero' or 'uniform', got '", masked_rows, "'");
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d));
  VLMKERN_CHECK(std::isfinite(s), op, "scale must be finite, got ", s);

  XattnParams p;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  for (int i = 0; i < 4; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  p.batch = q.size(0);
  p.seq_q = q.size(1);
  p.seq_k = k.size(1);
  p.heads_q = hq;
  p.heads_k = hk;
  p.head_dim = d;
  p.dtype = dt;
  p.scale = s;
  p.uniform_masked_rows = masked_rows == "uniform";

  VLMKERN_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), op,
                "cu_seqlens_q and cu_seqlens_k must be given together");
  if (cu_seqlens_q.has_value()) {
    p.packed = true;
    p.cu_q = index_arg(op, *cu_seqlens_q, q, "cu_seqlens_q", 1, "(N + 1,)");
    p.cu_k = index_arg(op, *cu_seqlens_k, q, "cu_seqlens_k", 1, "(N + 1,)");
    const int64_t n1 = cu_seqlens_q->size(0);
    VLMKERN_CHECK(n1 >= 1 && cu_seqlens_k->size(0) == n1, op,
                  "cu_seqlens_q and cu_seqlens_k must both have N + 1 >= 1 entries, got ", n1,
                  " and ", cu_seqlens_k->size(0));
    VLMKERN_CHECK(q.size(0) == 1, op, "packed q (with cu_seqlens) must be (1, total_q, Hq, D), "
                  "got batch ", q.size(0));
    p.num_segments = n1 - 1;
  } else {
    p.num_segments = p.batch;
  }
  VLMKERN_CHECK(!(kv_ranges.has_value() && prefix_len.has_value()), op,
                "kv_ranges and prefix_len cannot be combined");
  if (kv_ranges.has_value()) {
    p.has_ranges = true;
    p.ranges = index_arg(op, *kv_ranges, q, "kv_ranges", 4, "(B, Sq, R, 2)");
    VLMKERN_CHECK(kv_ranges->size(0) == p.batch && kv_ranges->size(1) == p.seq_q &&
                      kv_ranges->size(3) == 2,
                  op, "kv_ranges shape ", kv_ranges->sizes(), " must be (", p.batch, ", ",
                  p.seq_q, ", R, 2) to match q");
    p.num_ranges = kv_ranges->size(2);
  }
  if (prefix_len.has_value()) {
    p.prefix_lm = true;
    p.prefix = index_arg(op, *prefix_len, q, "prefix_len", 1, "(B,) or (N,)");
    VLMKERN_CHECK(prefix_len->size(0) == p.num_segments, op, "prefix_len has ",
                  prefix_len->size(0), " entries, expected one per sequence (",
                  p.num_segments, ")");
  }
  return p;
}

std::optional<std::tuple<at::Tensor, at::Tensor>> xattn_decode_gqa_as_rows(
    const XattnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_ranges, std::optional<double> scale,
    std::string_view masked_rows, XattnForwardFn forward) {
  if (p.packed || p.prefix_lm || p.seq_q != 1 || p.heads_q <= p.heads_k || p.batch == 0) {
    return std::nullopt;
  }
  const int64_t g = p.heads_q / p.heads_k;
  const at::Tensor qg = q.select(1, 0).unflatten(1, {p.heads_k, g}).transpose(1, 2);
  std::optional<at::Tensor> rg;
  if (kv_ranges) rg = kv_ranges->expand({p.batch, g, kv_ranges->size(2), 2});
  auto [og, lg] = forward(qg, k, v, rg, std::nullopt, std::nullopt, std::nullopt, scale,
                          masked_rows);  // (B, G, Hk, D), (B, Hk, G)
  return std::make_tuple(og.transpose(1, 2).reshape({p.batch, 1, p.heads_q, p.head_dim}),
                         lg.reshape({p.batch, p.heads_q, 1}));
}

void check_xattn_cuda(const char* op, const XattnParams& p) {
  VLMKERN_CHECK(p.dtype == at::kHalf || p.dtype == at::kBFloat16, op,
                "the CUDA kernel takes float16 or bfloat16 q, k, v, got ", p.dtype,
                " (cast them, or run on the CPU)");
  const int64_t d = p.head_dim;
  VLMKERN_CHECK(d == 64 || d == 72 || d == 80 || d == 96 || d == 128, op, "head dim D=", d,
                " is not supported on CUDA: D must be 64, 72, 80, 96 or 128 (the CPU path takes "
                "[1, ", kXattnMaxHeadDim, "])");
  VLMKERN_CHECK(p.heads_q <= 65535, op, "Hq=", p.heads_q, " q heads exceed the CUDA grid limit "
                "65535");
}

void check_xattn_backward(const XattnParams& p, const at::Tensor& grad_out, const at::Tensor& out,
                          const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse) {
  const char* op = "cross_attention_backward";
  const std::vector<int64_t> o_vec{p.batch, p.seq_q, p.heads_q, p.head_dim};
  const std::vector<int64_t> l_vec{p.batch, p.heads_q, p.seq_q};
  const at::IntArrayRef o_shape(o_vec), l_shape(l_vec);
  VLMKERN_CHECK(grad_out.sizes() == o_shape &&
                    out.sizes() == o_shape,
                op, "grad_out and out must be (B, Sq, Hq, D) = ", o_shape, ", got ",
                grad_out.sizes(), " and ", out.sizes());
  VLMKERN_CHECK(grad_out.scalar_type() == p.dtype && out.scalar_type() == p.dtype, op,
                "grad_out and out must have q's dtype ", p.dtype);
  const auto lt = xattn_lse_dtype(p.dtype);
  VLMKERN_CHECK(lse.sizes() == l_shape && lse.scalar_type() == lt, op,
                "lse must be (B, Hq, Sq) = ", l_shape, " of ", lt, ", got ", lse.sizes(), " of ",
                lse.scalar_type());
  if (grad_lse.has_value()) {
    VLMKERN_CHECK(grad_lse->sizes() == l_shape && grad_lse->scalar_type() == lt,
                  op, "grad_lse must be (B, Hq, Sq) = ", l_shape, " of ", lt);
  }
}

int64_t check_mllama_mask(const at::Tensor& mask, int64_t num_vision_tokens) {
  const char* op = "mllama_kv_ranges";
  check_rank(mask, 4, op, "cross_attention_mask", "(B, S, M, T)");
  VLMKERN_CHECK(!mask.is_complex() && !mask.is_quantized(), op,
                "cross_attention_mask must be an integer, bool or float tensor, got ",
                mask.scalar_type());
  VLMKERN_CHECK(num_vision_tokens >= 1, op, "num_vision_tokens must be >= 1, got ",
                num_vision_tokens);
  const int64_t tiles = mask.size(2) * mask.size(3);
  VLMKERN_CHECK(tiles * num_vision_tokens <= INT32_MAX, op, "M*T*num_vision_tokens = ",
                tiles * num_vision_tokens, " keys exceed int32 ranges");
  return (tiles + 1) / 2;
}

}  // namespace vlmkern
