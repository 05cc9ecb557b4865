// Torch-free launcher of the shuffle + LayerNorm kernel (cuda/kernels/shuffle_layer_norm.cuh):
// InternVL's pixel shuffle and LayerNorm(4C) in one pass, for the projector's CUDA path.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vlmkern {

constexpr int kShuffleLnThreads = 256;  // threads (8 warps) per row
constexpr int kShuffleLnMaxVecs = 8;    // 8-element vectors per thread: K <= 16384

struct ShuffleLnArgs {
  const void* x = nullptr;       // (B, H, W, C) T, channel stride 1
  const void* weight = nullptr;  // (K,) T or nullptr
  const void* bias = nullptr;    // (K,) T or nullptr
  void* out = nullptr;           // (M, K) T, contiguous; nullptr: the statistics only
  float* mean = nullptr;         // (M,) fp32, or nullptr (rms)
  float* rstd = nullptr;         // (M,) fp32
  int64_t rows = 0;              // M = B * gh * gw
  int64_t gh = 0, gw = 0;        // output grid (H / r, W / r)
  int64_t stride_b = 0, stride_h = 0, stride_w = 0;  // x strides, elements (multiples of 8)
  int r = 1, c = 0, k = 0;       // K = r * r * C, C a multiple of 8
  float eps = 1e-5f;
  int rms = 0;  // RMSNorm statistics (statistics only): rstd = rsqrt(mean(x^2) + eps), no mean
};

enum class ShuffleLnDtype : int { kFloat16, kBFloat16 };

// Why `a` cannot take the kernel (nullptr when it can): K past 8 * 256 * 8 = 16384, C not a
// multiple of 8, strides or pointers not 16-byte aligned, RMSNorm with an output or LayerNorm
// without a mean.
const char* shuffle_layer_norm_unsupported(const ShuffleLnArgs& a);

// Enqueues the kernel on `stream` (nothing for zero rows); returns the launch status.
cudaError_t cuda_shuffle_layer_norm(const ShuffleLnArgs& a, ShuffleLnDtype dtype,
                                    cudaStream_t stream);

}  // namespace vlmkern
