// Cross-attention argument checks shared by every device (shapes, dtypes, devices: no host
// sync), and the torch-free parameter block the kernels read.
//
// Op form of every layout: q (B, Sq, Hq, D), k / v (B, Sk, Hk, D), any strides (HF's (B, H, S, D)
// is a transposed view, packed (total, H, D) is (1, total, H, D) with cu_seqlens, learned
// queries shared by a batch are an expanded view with batch stride 0).
// Visibility of key j to query row i of one sequence (Lq rows, Lk keys):
//   - default: every key;
//   - kv_ranges (B, Sq, R, 2) int: the union of [start, end) over the row's R ranges (Mllama);
//   - prefix_len (B or N,) int: j < prefix_len or j <= i + (Lk - Lq) (PaliGemma prefix-LM,
//     bottom-right aligned so a decode step with Lq < Lk sees its own past).
// Rows that see no key: out = 0, lse = -inf ("zero"), or the row attends over all Lk keys
// ("uniform": HF Mllama, whose additive mask row is all 0 for such rows).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

namespace vlmkern {

constexpr int64_t kXattnMaxHeadDim = 256;

// An int32 or int64 index tensor (strides in elements).
struct XattnIndex {
  const void* data = nullptr;
  bool is64 = false;
  int64_t stride[4] = {};
  int64_t at(int64_t off) const {
    return is64 ? static_cast<const int64_t*>(data)[off] : static_cast<const int32_t*>(data)[off];
  }
};

struct XattnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride[4] = {}, k_stride[4] = {}, v_stride[4] = {};  // (B, S, H, D), elements
  int64_t batch = 0, seq_q = 0, seq_k = 0;
  int64_t heads_q = 0, heads_k = 0, head_dim = 0;
  at::ScalarType dtype = at::kFloat;
  double scale = 1.0;
  bool uniform_masked_rows = false;
  bool has_ranges = false;  // ranges (B, Sq, R, 2)
  XattnIndex ranges;
  int64_t num_ranges = 0;
  bool packed = false;  // cu_q, cu_k (N + 1,), B == 1
  XattnIndex cu_q, cu_k;
  int64_t num_segments = 0;
  bool prefix_lm = false;  // prefix (B or N,)
  XattnIndex prefix;
};

// Checks every argument of cross_attention (op names the op in messages) and packs them.
XattnParams make_xattn_params(const char* op, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const std::optional<at::Tensor>& kv_ranges,
                              const std::optional<at::Tensor>& cu_seqlens_q,
                              const std::optional<at::Tensor>& cu_seqlens_k,
                              const std::optional<at::Tensor>& prefix_len,
                              std::optional<double> scale, std::string_view masked_rows);

// What the CUDA kernel takes on top of make_xattn_params (the CPU path takes every dtype and
// D in [1, 256]): float16 / bfloat16, D in {64, 72, 80, 96, 128}, Hq <= 65535 (grid.y).
void check_xattn_cuda(const char* op, const XattnParams& p);

// The backward's extra tensors: grad_out and out (B, Sq, Hq, D), lse and grad_lse (B, Hq, Sq).
void check_xattn_backward(const XattnParams& p, const at::Tensor& grad_out, const at::Tensor& out,
                          const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse);

// dtype of the log-sum-exp output: float32, float64 for float64 inputs.
inline at::ScalarType xattn_lse_dtype(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

// A device's cross_attention (the op's signature).
using XattnForwardFn = std::tuple<at::Tensor, at::Tensor> (*)(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_ranges, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& prefix_len,
    std::optional<double> scale, std::string_view masked_rows);

// Decode step with GQA (Sq == 1, Hq = G * Hk > Hk, not packed, no prefix-LM): runs `forward` on
// the G q heads of each kv head as G query rows of that head, so each K / V tile is read once
// per group instead of G times; the same math (the G rows are one token with one visibility).
// q (B, 1, Hq, D) -> (B, G, Hk, D) view (h = hk * G + g), kv_ranges (B, 1, R, 2) -> (B, G, R, 2)
// expanded, and the (out, lse) mapped back. nullopt when it does not apply.
std::optional<std::tuple<at::Tensor, at::Tensor>> xattn_decode_gqa_as_rows(
    const XattnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_ranges, std::optional<double> scale,
    std::string_view masked_rows, XattnForwardFn forward);

// mllama_kv_ranges: mask (B, S, M, T) of any integer / bool / float dtype; returns R, the fixed
// number of ranges per row: ceil(M*T/2), the most a 0/1 row of M*T tiles can hold after merging.
int64_t check_mllama_mask(const at::Tensor& mask, int64_t num_vision_tokens);

}  // namespace vlmkern
