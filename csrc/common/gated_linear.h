// gated_linear (Mllama / Flamingo gated residual: out = residual + tanh(gate) * (x @ w^T + b)):
// argument checks, the device-independent ATen forward composite and the backward, shared by the
// CPU and CUDA registrations (CUDA fuses the forward into one cuBLASLt GEMM epilogue).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace vlmkern {

// Sizes of one call: x (..., K) viewed as (M, K) rows, weight (N, K), out (..., N).
struct GatedLinearShape {
  int64_t m, n, k;
  std::vector<int64_t> out_sizes;
};

// Every argument check of the op (messages "vlmkern.gated_linear: ...", naming the argument).
GatedLinearShape check_gated_linear(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& gate, const at::Tensor& residual,
                                    const std::optional<at::Tensor>& bias);

// tanh(gate) as an fp32 0-dim tensor on gate's device (no host sync).
at::Tensor gated_linear_tanh(const at::Tensor& gate);

// The forward as ATen ops with no host sync (mm, then one addcmul): x2 (M, K), residual2 (M, N).
at::Tensor gated_linear_composite(const at::Tensor& x2, const at::Tensor& weight,
                                  const at::Tensor& gate, const at::Tensor& residual2,
                                  const std::optional<at::Tensor>& bias);

// The backward (ATen GEMMs, no host sync): (dx, dweight, dgate, dbias), undefined where
// output_mask is off. d(residual) is grad_out itself (the autograd formula passes it through).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& gate, const std::optional<at::Tensor>& bias,
    std::array<bool, 4> output_mask);

}  // namespace vlmkern
