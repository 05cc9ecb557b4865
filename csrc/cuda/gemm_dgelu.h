// Torch-free launcher of the GELU backward fused into a GEMM epilogue (CUTLASS 3.x, Hopper sm_90a
// only): dh (M, N) = gelu'(pre (M, N)) * (g (M, K) @ w (K, N)), the projector's dGELU after its
// second Linear's input gradient, so g @ w is never written (nor read back) on its own.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/gemm_bias_act.h"

namespace vlmkern {

// gelu' is the exact (erf) GELU's, in fp32 as torch's CUDA gelu_backward computes it:
// Φ(z) + z·φ(z) = 0.5(1 + erff(z/√2)) + z·expf(-z²/2)/√(2π), times the fp32 accumulator.
struct GemmDGeluParams {
  GemmDtype dtype;
  int64_t m, n, k;  // M >= 1 rows of g; N features of pre / dh; K reduction (g's columns)
  const void* g;    // (M, K), row stride ldg (elements), unit column stride: the output gradient
  int64_t ldg;      // >= K
  const void* w;    // (K, N) contiguous (row-major): the second Linear's weight as stored
  const void* pre;  // (M, N) contiguous: GEMM1 + b1 before the activation (the forward's hidden)
  void* out;        // (M, N) contiguous: dh
  int device;       // CUDA device of every pointer (and of the stream)
};

// nullptr when `p` can run on the fused kernel, else why not: built without the CUTLASS sm_90a
// path, a device that is not compute capability 9.0, sizes >= 2^31, or TMA's alignment
// (16-byte pointers; K, N, ldg multiples of 8 elements) unmet.
const char* gemm_dgelu_unsupported(const GemmDGeluParams& p);

// Workspace bytes `gemm_dgelu` needs for `p` (the caller allocates them).
size_t gemm_dgelu_workspace_size(const GemmDGeluParams& p);

// Enqueues the GEMM on `stream` (no host synchronization; CUDA-graph capturable). `p` must have
// passed gemm_dgelu_unsupported.
cudaError_t gemm_dgelu(const GemmDGeluParams& p, void* workspace, cudaStream_t stream);

// One compiled kernel per dtype: defined in kernels/gemm_dgelu.cuh, explicitly instantiated by
// cuda/instantiations/gemm_dgelu_{bf16,fp16}.cu.
template <GemmDtype kDtype>
struct GemmDGeluVariant {
  static bool can_implement(const GemmDGeluParams& p);  // CUTLASS's own checks
  static size_t workspace_size(const GemmDGeluParams& p);
  static cudaError_t run(const GemmDGeluParams& p, void* workspace, cudaStream_t stream);
};

}  // namespace vlmkern
