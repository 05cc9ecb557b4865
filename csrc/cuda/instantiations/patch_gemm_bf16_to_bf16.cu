// One variant of the implicit-GEMM patch embedding (cuda/kernels/patch_gemm.cuh): bf16 pixels,
// bf16 weights and tokens.
#include "cuda/kernels/patch_gemm.cuh"

namespace vlmkern {
template struct PatchGemmVariant<PatchifyDtype::kBFloat16, PatchifyDtype::kBFloat16>;
}  // namespace vlmkern
