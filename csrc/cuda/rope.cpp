// CUDA implementations of rope / rope_backward / rope_ / rope_cos_sin(_backward): the shared
// bodies of common/rope.h, then the torch-free kernel on the current stream of q's device.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/rope.h"
#include "cuda/rope.h"
#include "ops.h"

namespace vlmkern {
namespace {

struct CudaRope {
  static void run(const RopeParams& p, const at::Tensor& q) {
    const c10::cuda::CUDAGuard guard(q.device());
    C10_CUDA_CHECK(cuda_rope(p, c10::cuda::getCurrentCUDAStream(q.device().index()).stream()));
  }
};
using Impl = RopeImpl<CudaRope>;

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& positions,
                                             at::ArrayRef<double> inv_freq,
                                             at::IntArrayRef freq_axis, double scale) {
  return Impl::rope(q, k, positions, inv_freq, freq_axis, scale, false);
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cuda(const at::Tensor& grad_q,
                                                      const at::Tensor& grad_k,
                                                      const at::Tensor& positions,
                                                      at::ArrayRef<double> inv_freq,
                                                      at::IntArrayRef freq_axis, double scale) {
  return Impl::rope(grad_q, grad_k, positions, inv_freq, freq_axis, scale, true);
}

std::tuple<at::Tensor, at::Tensor> rope_cos_sin_cuda(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& cos, const at::Tensor& sin,
                                                     bool inverse) {
  return Impl::cos_sin(q, k, cos, sin, inverse);
}

void rope_inplace_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                       at::ArrayRef<double> inv_freq, at::IntArrayRef freq_axis, double scale) {
  Impl::in_place(q, k, positions, inv_freq, freq_axis, scale);
}

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) {
  m.impl("rope", &rope_cuda);
  m.impl("rope_backward", &rope_backward_cuda);
  m.impl("rope_", &rope_inplace_cuda);
  m.impl("rope_cos_sin", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                            const at::Tensor& sin) {
    return rope_cos_sin_cuda(q, k, cos, sin, false);
  });
  m.impl("rope_cos_sin_backward", [](const at::Tensor& gq, const at::Tensor& gk,
                                     const at::Tensor& cos, const at::Tensor& sin) {
    return rope_cos_sin_cuda(gq, gk, cos, sin, true);
  });
}

}  // namespace vlmkern
