// Position-rows kernel (torch-free): Qwen3-VL's bilinearly resampled position embedding of every
// packed token, plus the patch bias, as the (N, D) addend a GEMM epilogue reads (one pass; the
// ATen path gathered four fp32 (N, D) temporaries). Row r: out = T(T(sum_k table[idx_k] * w_k) +
// bias), the taps summed in fp32 in tap order (nvcc may fuse them into FMAs) and rounded to T,
// like HF's (embedding * weights).sum(1).to(dtype), then the bias added in fp32. HF rounds
// conv + bias first and adds the positions after; the two orders differ by about an ulp of T.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/kernels/float_cast.cuh"

namespace vlmkern {

constexpr int kPositionRowsThreads = 128;

// One block per row (grid-stride over rows), threads over the D features (coalesced).
template <typename T>
__global__ void __launch_bounds__(kPositionRowsThreads)
    position_rows_kernel(const T* __restrict__ table,      // (S*S, D) T, contiguous
                         const int64_t* __restrict__ index,  // (4, N) tap rows of the table
                         const float* __restrict__ weight,   // (4, N) tap weights, fp32
                         const T* __restrict__ bias,         // (D,) T, or nullptr
                         T* __restrict__ out,                // (N, D) T, contiguous
                         int64_t n, int64_t d) {
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const T* rows[4];
    float w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      rows[k] = table + index[k * n + r] * d;
      w[k] = weight[k * n + r];
    }
    T* o = out + r * d;
    for (int64_t j = threadIdx.x; j < d; j += kPositionRowsThreads) {
      float p = static_cast<float>(rows[0][j]) * w[0];
      p += static_cast<float>(rows[1][j]) * w[1];
      p += static_cast<float>(rows[2][j]) * w[2];
      p += static_cast<float>(rows[3][j]) * w[3];
      float v = static_cast<float>(from_float<T>(p));
      if (bias != nullptr) v += static_cast<float>(bias[j]);
      o[j] = from_float<T>(v);
    }
  }
}

}  // namespace vlmkern
