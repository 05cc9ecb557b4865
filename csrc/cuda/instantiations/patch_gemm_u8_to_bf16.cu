// One variant of the implicit-GEMM patch embedding (cuda/kernels/patch_gemm.cuh): u8 pixels,
// bf16 weights and tokens.
#include "cuda/kernels/patch_gemm.cuh"

namespace vlmkern {
template struct PatchGemmVariant<PatchifyDtype::kUInt8, PatchifyDtype::kBFloat16>;
}  // namespace vlmkern
