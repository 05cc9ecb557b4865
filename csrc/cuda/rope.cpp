// CUDA implementations of rope / rope_backward / rope_: shared checks, then the torch-free
// table-driven kernel on the current stream of the inputs' device.
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/rope.h"
#include "cuda/rope.h"
#include "ops.h"

namespace vlmkern {
namespace {

void run(const RopeParams& p, const at::Tensor& q) {
  const c10::cuda::CUDAGuard guard(q.device());
  C10_CUDA_CHECK(cuda_rope(p, c10::cuda::getCurrentCUDAStream(q.device().index()).stream()));
}

std::tuple<at::Tensor, at::Tensor> out_of_place(const char* op, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& positions,
                                                at::ArrayRef<double> inv_freq,
                                                at::IntArrayRef freq_axis, double scale,
                                                bool inverse) {
  RopeParams p = make_rope_params(op, q, k, positions, inv_freq, freq_axis, scale, inverse);
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  set_rope_outputs(p, q_out, k_out);
  run(p, q);
  return {q_out, k_out};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& positions,
                                             at::ArrayRef<double> inv_freq,
                                             at::IntArrayRef freq_axis, double scale) {
  return out_of_place("rope", q, k, positions, inv_freq, freq_axis, scale, false);
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cuda(const at::Tensor& grad_q,
                                                      const at::Tensor& grad_k,
                                                      const at::Tensor& positions,
                                                      at::ArrayRef<double> inv_freq,
                                                      at::IntArrayRef freq_axis, double scale) {
  return out_of_place("rope_backward", grad_q, grad_k, positions, inv_freq, freq_axis, scale,
                      true);
}

std::tuple<at::Tensor, at::Tensor> rope_cos_sin_cuda(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& cos, const at::Tensor& sin,
                                                     bool inverse) {
  const char* op = inverse ? "rope_cos_sin_backward" : "rope_cos_sin";
  RopeParams p = make_rope_cos_sin_params(op, q, k, cos, sin, inverse);
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  set_rope_outputs(p, q_out, k_out);
  run(p, q);
  return {q_out, k_out};
}

void rope_inplace_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                       at::ArrayRef<double> inv_freq, at::IntArrayRef freq_axis, double scale) {
  RopeParams p = make_rope_params("rope_", q, k, positions, inv_freq, freq_axis, scale, false);
  check_rope_inplace_targets(q, k);
  set_rope_outputs(p, q, k);
  run(p, q);
}

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) {
  m.impl("rope", &rope_cuda);
  m.impl("rope_backward", &rope_backward_cuda);
  m.impl("rope_", &rope_inplace_cuda);
  m.impl("rope_cos_sin", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                            const at::Tensor& sin) { return rope_cos_sin_cuda(q, k, cos, sin, false); });
  m.impl("rope_cos_sin_backward", [](const at::Tensor& gq, const at::Tensor& gk,
                                     const at::Tensor& cos, const at::Tensor& sin) {
    return rope_cos_sin_cuda(gq, gk, cos, sin, true);
  });
}

}  // namespace vlmkern
