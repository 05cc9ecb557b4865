// Split-KV combine for the CUDA cross-attention forward (torch-free): one warp per (b, row, head)
// merges the num_splits partial outputs (each normalized by its own softmax sum) with weights
// exp(lse_s - max lse) and writes out and the combined lse. A row whose partials are all -inf
// (it saw no key) gets out = 0, lse = -inf, as the unsplit kernel writes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/cross_attention.h"

namespace vlmkern::xattn_cuda {

constexpr int kCombineThreads = 128;
constexpr int kMaxSplits = 64;

template <typename T>
__device__ __forceinline__ T combine_cast(float v);
template <>
__device__ __forceinline__ __half combine_cast<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 combine_cast<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    cross_attention_combine_kernel(const XattnCudaParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = p.batch * p.seq_q * p.heads_q;
  const int64_t warps = kCombineThreads / 32;
  const int splits = p.num_splits, d = p.head_dim;
  const int64_t zs = p.batch * p.heads_q * p.seq_q;  // lse_part stride between runs
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; idx < rows;
       idx += static_cast<int64_t>(gridDim.x) * warps) {
    // idx = (b * Sq + s) * Hq + h: the row of out (B, Sq, Hq, D)
    const int64_t h = idx % p.heads_q, bs = idx / p.heads_q;
    const int64_t s = bs % p.seq_q, b = bs / p.seq_q;
    const float* lz = p.lse_part + (b * p.heads_q + h) * p.seq_q + s;  // run z at lz[z * zs]
    // Lane j holds runs j and j + 32 (splits <= 64). NaN propagates through the max and the
    // weights (a NaN partial must not be dropped as an empty run).
    const float l0 = lane < splits ? lz[lane * zs] : -INFINITY;
    const float l1 = lane + 32 < splits ? lz[(lane + 32) * zs] : -INFINITY;
    float mx = (l0 != l0 || l1 != l1) ? NAN : fmaxf(l0, l1);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      const float o = __shfl_xor_sync(0xffffffffu, mx, off);
      mx = (o != o || mx != mx) ? NAN : fmaxf(mx, o);
    }
    const bool dead = mx == -INFINITY;  // every run saw nothing: out 0, lse -inf
    const float w0 = dead ? 0.f : expf(l0 - mx), w1 = dead ? 0.f : expf(l1 - mx);
    float wsum = w0 + w1;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) wsum += __shfl_xor_sync(0xffffffffu, wsum, off);
    const float inv = dead ? 0.f : 1.f / wsum;
    const float* po = p.o_part + idx * d;  // run z's (D,) partial at po[z * rows * d]
    T* out = static_cast<T*>(p.out) + idx * d;  // (D,) row of out
    for (int c = lane; c < d; c += 32) {
      float acc = 0.f;
      for (int z = 0; z < splits; ++z) {  // every valid row's partial is written (0: empty run)
        const float wz = __shfl_sync(0xffffffffu, z < 32 ? w0 : w1, z & 31);
        acc += wz * po[static_cast<int64_t>(z) * rows * d + c];
      }
      out[c] = combine_cast<T>(acc * inv);
    }
    if (lane == 0) {
      p.lse[(b * p.heads_q + h) * p.seq_q + s] = dead ? -INFINITY : mx + logf(wsum);
    }
  }
}

}  // namespace vlmkern::xattn_cuda
