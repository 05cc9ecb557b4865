// Patchify kernel (torch-free): each block fills kPatchifyRows rows of the (M, kp) patch matrix.
// The in-patch source offset of every feature k is the same for all rows, so a block computes
// that table once into shared memory; a row is then base(b, ph, pw) + table[k], written with
// consecutive threads on consecutive k (coalesced stores; reads follow the P-long pixel runs).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace vlmkern {

constexpr int kPatchifyThreads = 256;
constexpr int kPatchifyRows = 8;  // rows per block (per table build)

template <typename T>
__device__ __forceinline__ T patchify_cast(float v);
template <>
__device__ __forceinline__ float patchify_cast<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half patchify_cast<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 patchify_cast<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Same dtype: the element as is. uint8 -> float dtype: exact in every target (0..255).
template <typename In, typename Out>
__device__ __forceinline__ Out patchify_convert(In v) {
  if constexpr (std::is_same_v<In, Out>) {
    return v;
  } else {
    return patchify_cast<Out>(static_cast<float>(v));
  }
}

struct PatchifyArgs {
  int64_t rows;              // M = batch * gh * gw
  int64_t gh, gw;
  int channels, patch, k, kp;
  int channels_last;
  int64_t stride_b, stride_c, stride_h, stride_w;
};

// pixels: (B, C, H, W) at the given strides; out: (M, kp) contiguous.
template <typename In, typename Out>
__global__ void __launch_bounds__(kPatchifyThreads)
    patchify_kernel(const In* __restrict__ pixels, Out* __restrict__ out, PatchifyArgs a) {
  extern __shared__ int patch_offset[];  // (kp,) in-patch source offset of feature k, -1 = pad
  const int p = a.patch, c = a.channels;
  for (int k = threadIdx.x; k < a.kp; k += blockDim.x) {
    int off = -1;
    if (k < a.k) {
      int ch, i, j;
      if (a.channels_last) {  // k = (i*P + j)*C + ch
        ch = k % c;
        j = (k / c) % p;
        i = k / (c * p);
      } else {  // k = (ch*P + i)*P + j
        j = k % p;
        i = (k / p) % p;
        ch = k / (p * p);
      }
      off = static_cast<int>(ch * a.stride_c + i * a.stride_h + j * a.stride_w);
    }
    patch_offset[k] = off;
  }
  __syncthreads();
  const int64_t per_image = a.gh * a.gw;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kPatchifyRows; first < a.rows;
       first += static_cast<int64_t>(gridDim.x) * kPatchifyRows) {
    const int64_t last = first + kPatchifyRows < a.rows ? first + kPatchifyRows : a.rows;
    for (int64_t m = first; m < last; ++m) {
      const int64_t b = m / per_image, rem = m - b * per_image;
      const int64_t ph = rem / a.gw, pw = rem - ph * a.gw;
      const In* src = pixels + b * a.stride_b + ph * p * a.stride_h + pw * p * a.stride_w;
      Out* dst = out + m * a.kp;
      for (int k = threadIdx.x; k < a.kp; k += blockDim.x) {
        const int off = patch_offset[k];
        dst[k] = off >= 0 ? patchify_convert<In, Out>(src[off]) : patchify_cast<Out>(0.0f);
      }
    }
  }
}

}  // namespace vlmkern
