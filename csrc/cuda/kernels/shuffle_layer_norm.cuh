// Shuffle + LayerNorm kernel (torch-free): InternVL's connector prologue in one pass. Row m of the
// pixel-shuffled matrix (K = r*r*C features, feature (dy*r + dx)*C + c = x[b, r*i + dy, r*j + dx,
// c]) is gathered straight from x, normalized over its K features (fp32 statistics, biased
// variance, rsqrt(var + eps), as ATen's LayerNorm) and written once with its mean and rstd; the
// shuffled copy that a separate shuffle and LayerNorm would write and re-read never exists.
// Without an output (out == nullptr) only the statistics are written: the shuffle GEMM then
// normalizes its A tiles itself (cuda/kernels/shuffle_gemm.cuh, the same arithmetic); rms: only
// an RMSNorm's rstd = rsqrt(mean(x^2) + eps) (Qwen2.5-VL's merger, in fp32 as Qwen2RMSNorm).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/kernels/float_cast.cuh"
#include "cuda/kernels/norm_affine.cuh"
#include "cuda/shuffle_layer_norm.h"

namespace vlmkern {


// Sum of v over the block (kShuffleLnThreads threads); every thread gets it. `red` (8,) smem.
__device__ __forceinline__ float sln_block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // red may still be read by the previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kShuffleLnThreads / 32; ++w) s += red[w];
  return s;
}

// One block per row (grid-strided); each thread holds up to kVecs 8-element vectors of the row
// in fp32 registers: K <= 8 * kShuffleLnThreads * kVecs.
template <typename T, int kVecs>
__global__ void __launch_bounds__(kShuffleLnThreads)
    shuffle_layer_norm_kernel(const ShuffleLnArgs a) {
  static_assert(sizeof(T) == 2, "16-byte vectors of 8 fp16 / bf16");
  __shared__ float red[kShuffleLnThreads / 32];  // (8,) per-warp partial sums
  const T* x = static_cast<const T*>(a.x);
  const T* gamma = static_cast<const T*>(a.weight);
  const T* beta = static_cast<const T*>(a.bias);
  T* out = static_cast<T*>(a.out);
  const float inv_k = 1.f / static_cast<float>(a.k);
  for (int64_t m = blockIdx.x; m < a.rows; m += gridDim.x) {
    const int64_t b = m / (a.gh * a.gw), i = (m / a.gw) % a.gh, j = m % a.gw;
    const T* row = x + b * a.stride_b + a.r * i * a.stride_h + a.r * j * a.stride_w;
    float v[kVecs][8];  // this thread's features kk .. kk + 7 of the row, fp32
    float sum = 0.f;
#pragma unroll
    for (int u = 0; u < kVecs; ++u) {
      const int kk = (u * kShuffleLnThreads + static_cast<int>(threadIdx.x)) * 8;
      if (kk < a.k) {
        const int q = kk / a.c, cc = kk % a.c;  // chunk (dy * r + dx), channel
        const int dy = q / a.r, dx = q % a.r;
        const uint4 raw =
            *reinterpret_cast<const uint4*>(row + dy * a.stride_h + dx * a.stride_w + cc);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          v[u][t] = static_cast<float>(e[t]);
          sum += v[u][t];
        }
      }
    }
    const float mean = a.rms ? 0.f : sln_block_sum(sum, red) * inv_k;
    float sq = 0.f;
#pragma unroll
    for (int u = 0; u < kVecs; ++u) {
      const int kk = (u * kShuffleLnThreads + static_cast<int>(threadIdx.x)) * 8;
      if (kk < a.k) {
#pragma unroll
        for (int t = 0; t < 8; ++t) sq += (v[u][t] - mean) * (v[u][t] - mean);
      }
    }
    const float rstd = rsqrtf(sln_block_sum(sq, red) * inv_k + a.eps);
#pragma unroll
    for (int u = 0; u < kVecs; ++u) {
      const int kk = (u * kShuffleLnThreads + static_cast<int>(threadIdx.x)) * 8;
      if (out != nullptr && kk < a.k) {
        uint4 packed;
        T* o = reinterpret_cast<T*>(&packed);
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          const float g = gamma != nullptr ? static_cast<float>(gamma[kk + t]) : 1.f;
          const float be = beta != nullptr ? static_cast<float>(beta[kk + t]) : 0.f;
          o[t] = from_float<T>(
              layer_norm_value(v[u][t], mean, rstd, gamma != nullptr, g, beta != nullptr, be));
        }
        *reinterpret_cast<uint4*>(out + m * a.k + kk) = packed;
      }
    }
    if (threadIdx.x == 0) {
      if (a.mean != nullptr) a.mean[m] = mean;
      a.rstd[m] = rstd;
    }
  }
}

}  // namespace vlmkern
