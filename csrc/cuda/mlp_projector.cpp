// CUDA registration of mlp_projector and its backward: the shared ATen composite (cuBLAS GEMMs,
// ATen elementwise kernels, no host syncs) under a guard for x's device, until the fused CUTLASS
// kernels (GEMM + bias + erf GELU epilogue, norm / shuffle in the operand load) replace it.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/mlp_projector.h"
#include "ops.h"

namespace vlmkern {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_projector_cuda(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
    std::string_view activation, std::string_view norm, std::string_view norm_position, double eps,
    int64_t shuffle, int64_t merge) {
  const auto opt = parse_projector_options(activation, norm, norm_position, eps, shuffle, merge);
  const c10::cuda::CUDAGuard guard(x.device());
  return mlp_projector_forward(x, w1, b1, w2, b2, norm_weight, norm_bias, opt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mlp_projector_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                            const std::optional<at::Tensor>& w2,
                            const std::optional<at::Tensor>& norm_weight,
                            const std::optional<at::Tensor>& norm_bias, const at::Tensor& hidden,
                            const at::Tensor& mean, const at::Tensor& rstd,
                            std::string_view activation, std::string_view norm,
                            std::string_view norm_position, double eps, int64_t shuffle,
                            int64_t merge, std::array<bool, 7> output_mask) {
  const auto opt = parse_projector_options(activation, norm, norm_position, eps, shuffle, merge);
  const c10::cuda::CUDAGuard guard(x.device());
  return mlp_projector_backward_impl(grad_out, x, w1, w2, norm_weight, norm_bias, hidden, mean,
                                     rstd, opt, output_mask);
}

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) {
  m.impl("mlp_projector", &mlp_projector_cuda);
  m.impl("mlp_projector_backward", &mlp_projector_backward_cuda);
}

}  // namespace vlmkern
