// One variant of the pixel-shuffle GEMM (cuda/kernels/shuffle_gemm.cuh): fp16.
#include "cuda/kernels/shuffle_gemm.cuh"

namespace vlmkern {
template struct ShuffleGemmVariant<GemmDtype::kFloat16>;
}  // namespace vlmkern
