// The one-thread kernel behind cuda_gated_linear_scalars: tanh of the gate, in fp32, and the
// GEMM's beta = 1, both in device memory for cuBLASLt's device pointer mode.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/gated_linear.h"

namespace vlmkern {
namespace {

template <typename T>
__global__ void gated_linear_scalars_kernel(const T* __restrict__ gate,  // (1,) any float
                                            float* __restrict__ scalars) {  // (2,) fp32
  scalars[0] = tanhf(static_cast<float>(*gate));
  scalars[1] = 1.0f;
}

template <typename T>
cudaError_t launch(const void* gate, float* scalars, cudaStream_t stream) {
  gated_linear_scalars_kernel<T><<<1, 1, 0, stream>>>(static_cast<const T*>(gate), scalars);
  return cudaGetLastError();
}

}  // namespace

cudaError_t cuda_gated_linear_scalars(const void* gate, GateDtype dtype, float* scalars,
                                      cudaStream_t stream) {
  switch (dtype) {
    case GateDtype::kFloat32:
      return launch<float>(gate, scalars, stream);
    case GateDtype::kFloat16:
      return launch<__half>(gate, scalars, stream);
    case GateDtype::kBFloat16:
      return launch<__nv_bfloat16>(gate, scalars, stream);
    case GateDtype::kFloat64:
      return launch<double>(gate, scalars, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vlmkern
