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
  const int64_t splits = p.num_splits, d = p.head_dim;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; idx < rows;
       idx += static_cast<int64_t>(gridDim.x) * warps) {
    // idx = (b * Sq + s) * Hq + h: the row of out (B, Sq, Hq, D)
    const int64_t h = idx % p.heads_q, bs = idx / p.heads_q;
    const int64_t s = bs % p.seq_q, b = bs / p.seq_q;
    float mx = -INFINITY;  // max partial lse of the row
    for (int64_t z = 0; z < splits; ++z) {
      mx = fmaxf(mx, p.lse_part[((z * p.batch + b) * p.heads_q + h) * p.seq_q + s]);
    }
    // Weights exp(lse_z - max) (0 for an all -inf row), recomputed where used: no local array.
    const float* lz = p.lse_part + (b * p.heads_q + h) * p.seq_q + s;  // lse_part[z] at z * zs
    const int64_t zs = p.batch * p.heads_q * p.seq_q;
    float wsum = 0.f;
    for (int64_t z = 0; z < splits; ++z) wsum += mx == -INFINITY ? 0.f : expf(lz[z * zs] - mx);
    const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
    T* out = static_cast<T*>(p.out) + idx * d;  // (D,) row of out
    for (int64_t c = lane; c < d; c += 32) {
      float acc = 0.f;
      for (int64_t z = 0; z < splits; ++z) {
        const float wz = mx == -INFINITY ? 0.f : expf(lz[z * zs] - mx);
        if (wz != 0.f) acc += wz * p.o_part[(z * rows + idx) * d + c];
      }
      out[c] = combine_cast<T>(acc * inv);
    }
    if (lane == 0) {
      p.lse[(b * p.heads_q + h) * p.seq_q + s] = wsum > 0.f ? mx + logf(wsum) : -INFINITY;
    }
  }
}

}  // namespace vlmkern::xattn_cuda
