// from_float<T>(v): fp32 -> T with round-to-nearest-even, for the element types our kernels write
// (fp32, fp16, bf16). Torch-free; shared by the patchify, position-rows and shuffle-LayerNorm
// kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace vlmkern {

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace vlmkern
