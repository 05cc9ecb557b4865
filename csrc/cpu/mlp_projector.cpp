// CPU registration of mlp_projector and its backward: the shared ATen composite
// (common/mlp_projector.cpp), whose GEMMs are ATen's (oneDNN / BLAS) CPU matmuls.
#include <torch/library.h>

#include "common/mlp_projector.h"
#include "ops.h"

namespace vlmkern {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_projector_cpu(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
    std::string_view activation, std::string_view norm, std::string_view norm_position, double eps,
    int64_t shuffle, int64_t merge) {
  const auto opt = parse_projector_options(activation, norm, norm_position, eps, shuffle, merge);
  return mlp_projector_forward(x, w1, b1, w2, b2, norm_weight, norm_bias, opt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mlp_projector_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                           const std::optional<at::Tensor>& w2,
                           const std::optional<at::Tensor>& norm_weight,
                           const std::optional<at::Tensor>& norm_bias, const at::Tensor& hidden,
                           const at::Tensor& act, const at::Tensor& mean, const at::Tensor& rstd,
                           std::string_view activation, std::string_view norm,
                           std::string_view norm_position, double eps, int64_t shuffle,
                           int64_t merge, std::array<bool, 7> output_mask) {
  const auto opt = parse_projector_options(activation, norm, norm_position, eps, shuffle, merge);
  return mlp_projector_backward_impl(grad_out, x, w1, w2, norm_weight, norm_bias, hidden, act,
                                     mean, rstd, opt, output_mask);
}

TORCH_LIBRARY_IMPL(vlmkern, CPU, m) {
  m.impl("mlp_projector", &mlp_projector_cpu);
  m.impl("mlp_projector_backward", &mlp_projector_backward_cpu);
}

}  // namespace vlmkern
