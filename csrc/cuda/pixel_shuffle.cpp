// CUDA implementations of pixel_shuffle / pixel_unshuffle: checks and plan (shared with CPU), then
// the torch-free gather kernel on the current stream of the input's device.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/pixel_shuffle.h"
#include "cuda/strided_gather.h"
#include "ops.h"

namespace vlmkern {
namespace {

at::Tensor run(const at::Tensor& input, int64_t scale, bool inverse) {
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  return pixel_shuffle_impl(input, scale, inverse, [&](const GatherPlan& p, const void* in, void* out) {
    C10_CUDA_CHECK(cuda_strided_gather(p, in, out, stream));
  });
}

}  // namespace

at::Tensor pixel_shuffle_cuda(const at::Tensor& x, int64_t scale) { return run(x, scale, false); }

at::Tensor pixel_unshuffle_cuda(const at::Tensor& y, int64_t scale) { return run(y, scale, true); }

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) {
  m.impl("pixel_shuffle", &pixel_shuffle_cuda);
  m.impl("pixel_unshuffle", &pixel_unshuffle_cuda);
}

}  // namespace vlmkern
