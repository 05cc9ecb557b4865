// CPU gated_linear: one addmm (residual + tanh(gate) * x @ w^T, alpha = tanh(gate) read on the
// host, which is free here), and the shared ATen backward.
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <torch/library.h>

#include <cmath>

#include "common/gated_linear.h"
#include "ops.h"

namespace vlmkern {

at::Tensor gated_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& gate,
                            const at::Tensor& residual, const std::optional<at::Tensor>& bias) {
  const GatedLinearShape s = check_gated_linear(x, weight, gate, residual, bias);
  const double t = std::tanh(gate.reshape({}).item<double>());
  const at::Tensor r2 = residual.reshape({s.m, s.n});
  // residual + t * b + t * (x w^T): the bias joins the addend (one extra pass, bias only).
  const at::Tensor base = bias ? at::add(r2, *bias, t) : r2;
  return at::addmm(base, x.reshape({s.m, s.k}), weight.t(), /*beta=*/1, /*alpha=*/t)
      .view(s.out_sizes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& gate, const std::optional<at::Tensor>& bias,
    std::array<bool, 4> output_mask) {
  return gated_linear_backward_impl(grad_out, x, weight, gate, bias, output_mask);
}

TORCH_LIBRARY_IMPL(vlmkern, CPU, m) {
  m.impl("gated_linear", &gated_linear_cpu);
  m.impl("gated_linear_backward", &gated_linear_backward_cpu);
}

}  // namespace vlmkern
