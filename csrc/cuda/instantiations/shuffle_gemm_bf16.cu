// One variant of the pixel-shuffle GEMM (cuda/kernels/shuffle_gemm.cuh): bf16.
#include "cuda/kernels/shuffle_gemm.cuh"

namespace vlmkern {
template struct ShuffleGemmVariant<GemmDtype::kBFloat16>;
}  // namespace vlmkern
