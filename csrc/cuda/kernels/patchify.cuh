// Patchify kernel (torch-free): fills the (M, kp) patch matrix of a stride = kernel conv. The
// in-patch source offset of every feature k is the same for all rows, so each block builds that
// table once in shared memory and strides over groups of kPatchifyRows rows; an element is then
// row_base(b, ph, pw) + table[k]. Each thread moves 8 consecutive k (8 independent loads, one
// 16-byte store); consecutive threads write consecutive 16-byte chunks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/kernels/float_cast.cuh"

namespace vlmkern {

constexpr int kPatchifyThreads = 256;
constexpr int kPatchifyRows = 8;  // rows per block (per table build)

// Same dtype: the element as is. uint8 -> float dtype: exact in every target (0..255).
template <typename In, typename Out>
__device__ __forceinline__ Out patchify_convert(In v) {
  if constexpr (std::is_same_v<In, Out>) {
    return v;
  } else {
    return from_float<Out>(static_cast<float>(v));
  }
}

struct PatchifyArgs {
  int64_t rows;              // M = batch * gh * gw
  int64_t gh, gw;
  int channels, patch, k, kp;
  int channels_last;
  int64_t stride_b, stride_c, stride_h, stride_w;
};

// The channel and in-patch source offset of patch feature k < C*P*P: NCHW k = (ch*P + i)*P + j,
// NHWC (channels_last) k = (i*P + j)*C + ch; offset ch*stride_c + i*stride_h + j*stride_w
// (the launchers check it fits an int). Shared by the patchify and implicit-GEMM kernels.
__device__ __forceinline__ int patch_feature_offset(int k, int channels, int patch,
                                                    int channels_last, int64_t stride_c,
                                                    int64_t stride_h, int64_t stride_w,
                                                    int* channel = nullptr) {
  int ch, i, j;
  if (channels_last) {
    ch = k % channels;
    j = (k / channels) % patch;
    i = k / (channels * patch);
  } else {
    j = k % patch;
    i = (k / patch) % patch;
    ch = k / (patch * patch);
  }
  if (channel != nullptr) *channel = ch;
  return static_cast<int>(ch * stride_c + i * stride_h + j * stride_w);
}

// Patch row m = b * L + l (token l = ph * gw + pw of image b): b, l and the pixel offset of the
// patch's origin, b*stride_b + ph*P*stride_h + pw*P*stride_w. Shared by the patchify and
// implicit-GEMM kernels.
struct PatchRow {
  int64_t b, l, base;
};
__device__ __forceinline__ PatchRow patch_row(int64_t m, int64_t per_image, int64_t gw, int patch,
                                              int64_t stride_b, int64_t stride_h,
                                              int64_t stride_w) {
  const int64_t b = m / per_image, l = m - b * per_image;
  const int64_t ph = l / gw, pw = l - ph * gw;
  return {b, l, b * stride_b + ph * patch * stride_h + pw * patch * stride_w};
}

// Eight Out values to 16-byte aligned dst: one 16-byte store (fp16 / bf16) or two (fp32).
template <typename Out>
__device__ __forceinline__ void store8(Out* dst, const Out (&v)[8]) {
  if constexpr (sizeof(Out) == 2) {
    uint4 u;
    memcpy(&u, v, sizeof(u));
    *reinterpret_cast<uint4*>(dst) = u;
  } else {
    *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(dst + 4) = make_float4(v[4], v[5], v[6], v[7]);
  }
}

// pixels: (B, C, H, W) at the given strides; out: (M, kp) contiguous, kp % 8 == 0. Work item =
// (row, group of 8 consecutive k): 8 independent loads, one vector store. Blocks stride over
// groups of kPatchifyRows rows, so the offset table is built once per block.
template <typename In, typename Out>
__global__ void __launch_bounds__(kPatchifyThreads)
    patchify_kernel(const In* __restrict__ pixels, Out* __restrict__ out, PatchifyArgs a) {
  extern __shared__ int patch_offset[];  // (kp,) in-patch source offset of feature k, -1 = pad
  __shared__ int64_t row_base[kPatchifyRows];  // source offset of each row's patch origin
  const int p = a.patch, c = a.channels;
  for (int k = threadIdx.x; k < a.kp; k += blockDim.x) {
    patch_offset[k] = k < a.k ? patch_feature_offset(k, c, p, a.channels_last, a.stride_c,
                                                     a.stride_h, a.stride_w)
                              : -1;
  }
  const int groups = a.kp / 8, items = kPatchifyRows * groups;
  const int64_t per_image = a.gh * a.gw;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kPatchifyRows; first < a.rows;
       first += static_cast<int64_t>(gridDim.x) * kPatchifyRows) {
    if (threadIdx.x < kPatchifyRows && first + threadIdx.x < a.rows) {
      row_base[threadIdx.x] = patch_row(first + threadIdx.x, per_image, a.gw, p, a.stride_b,
                                        a.stride_h, a.stride_w).base;
    }
    __syncthreads();  // the table (first pass) and this group's row bases are ready
    for (int it = threadIdx.x; it < items; it += blockDim.x) {
      const int r = it / groups, k0 = (it - r * groups) * 8;
      if (first + r >= a.rows) break;  // items are row-major: every later one is past the end
      const In* src = pixels + row_base[r];
      Out v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int off = patch_offset[k0 + e];
        v[e] = off >= 0 ? patchify_convert<In, Out>(src[off]) : from_float<Out>(0.0f);
      }
      store8<Out>(out + (first + r) * a.kp + k0, v);
    }
    __syncthreads();  // row_base is rewritten by the next group
  }
}

}  // namespace vlmkern
