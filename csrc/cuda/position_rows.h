// Torch-free launcher of the position-rows kernel (cuda/kernels/position_rows.cuh): the (N, D)
// bilinear position + bias addend of packed Qwen3-VL patch embedding, for a GEMM epilogue.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vlmkern {

enum class PositionRowsDtype : int { kFloat32, kFloat16, kBFloat16 };

struct PositionRowsParams {
  const void* table = nullptr;    // (S*S, D), dtype, contiguous
  const int64_t* index = nullptr;  // (4, N) tap rows in [0, S*S)
  const float* weight = nullptr;   // (4, N) tap weights
  const void* bias = nullptr;     // (D,) dtype, or nullptr
  void* out = nullptr;            // (N, D) dtype, contiguous
  PositionRowsDtype dtype = PositionRowsDtype::kFloat32;
  int64_t n = 0, d = 0;
};

// Enqueues the kernel on `stream` (nothing for N = 0 or D = 0); returns the launch status.
cudaError_t cuda_position_rows(const PositionRowsParams& p, cudaStream_t stream);

}  // namespace vlmkern
