// One variant of the implicit-GEMM patch embedding (cuda/kernels/patch_gemm.cuh): fp16 pixels,
// fp16 weights and tokens.
#include "cuda/kernels/patch_gemm.cuh"

namespace vlmkern {
template struct PatchGemmVariant<PatchifyDtype::kFloat16, PatchifyDtype::kFloat16>;
}  // namespace vlmkern
