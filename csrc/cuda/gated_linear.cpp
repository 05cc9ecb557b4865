// CUDA gated_linear: out = residual + tanh(gate) * (x @ w^T) as ONE cuBLASLt matmul, D = alpha *
// (A B) + beta * C with alpha = tanh(gate) and beta = 1 read from device memory (no host sync,
// capturable) and C = residual, so neither the un-gated projection nor a scaled copy is written.
// A bias joins the residual first (one extra pass, bias only). Shapes or dtypes cuBLASLt does not
// take (fp64, K = 0, no algorithm) and VLMKERN_GATED_LINEAR=aten run the ATen composite (mm +
// addcmul), as does a build without cuBLASLt (cuda/lt_matmul.h). The backward is the shared ATen
// one (common/gated_linear.cpp).
#include <ATen/ops/addcmul.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <string_view>

#include "common/checks.h"
#include "common/gated_linear.h"
#include "cuda/gated_linear.h"
#include "cuda/lt_matmul.h"
#include "ops.h"

namespace vlmkern {
namespace {

constexpr const char* kOp = "gated_linear";

// VLMKERN_GATED_LINEAR, read per call: "lt" (or unset) the fused cuBLASLt GEMM, "aten" the
// composite (for comparison in the bench).
bool use_aten() {
  const char* env = std::getenv("VLMKERN_GATED_LINEAR");
  const std::string_view v = env ? env : "";
  VLMKERN_CHECK(v.empty() || v == "lt" || v == "aten", kOp,
                "VLMKERN_GATED_LINEAR must be 'lt' or 'aten', got '", std::string(v), "'");
  return v == "aten";
}

// A row-major (rows, cols) matrix as cuBLASLt takes it: unit column stride and a row pitch >= cols
// (a contiguous copy otherwise, the rare case), as a batch of one.
at::Tensor lt_operand(const at::Tensor& t) {
  const bool ok = t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) >= t.size(1));
  return (ok ? t : t.contiguous()).unsqueeze(0);
}

GateDtype gate_dtype(const at::Tensor& gate) {
  switch (gate.scalar_type()) {
    case at::kHalf:
      return GateDtype::kFloat16;
    case at::kBFloat16:
      return GateDtype::kBFloat16;
    case at::kDouble:
      return GateDtype::kFloat64;
    default:
      return GateDtype::kFloat32;
  }
}

}  // namespace

at::Tensor gated_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& gate,
                             const at::Tensor& residual, const std::optional<at::Tensor>& bias) {
  const GatedLinearShape s = check_gated_linear(x, weight, gate, residual, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({s.m, s.k});         // (M, K)
  const at::Tensor r2 = residual.reshape({s.m, s.n});  // (M, N)
  if (use_aten() || !lt_matmul_linked() || x.scalar_type() == at::kDouble || s.m == 0 ||
      s.n == 0 || s.k == 0) {
    return gated_linear_composite(x2, weight, gate, r2, bias).view(s.out_sizes);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  // (2,) fp32: alpha = tanh(gate), beta = 1, written on the stream before the GEMM reads them.
  const at::Tensor scalars = at::empty({2}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda_gated_linear_scalars(gate.const_data_ptr(), gate_dtype(gate),
                                           scalars.mutable_data_ptr<float>(), stream));
  // residual + tanh(gate) * b as the C operand when there is a bias (the GEMM adds the rest; the
  // tanh is rounded to x's dtype for this product, within the low-precision tier).
  const at::Tensor c2 = bias ? at::addcmul(r2, *bias, scalars[0]) : r2;
  at::Tensor out = at::empty({s.m, s.n}, x.options());
  const float* dev = scalars.const_data_ptr<float>();
  const LtMatmul mm{lt_operand(x2), lt_operand(weight), lt_operand(c2), out.unsqueeze(0),
                    dev, dev + 1, /*device_scalars=*/true};
  if (!lt_matmul(mm)) {
    return gated_linear_composite(x2, weight, gate, r2, bias).view(s.out_sizes);
  }
  return out.view(s.out_sizes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& gate, const std::optional<at::Tensor>& bias,
    std::array<bool, 4> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return gated_linear_backward_impl(grad_out, x, weight, gate, bias, output_mask);
}

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) {
  m.impl("gated_linear", &gated_linear_cuda);
  m.impl("gated_linear_backward", &gated_linear_backward_cuda);
}

}  // namespace vlmkern
