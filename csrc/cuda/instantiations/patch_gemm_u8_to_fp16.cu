// One variant of the implicit-GEMM patch embedding (cuda/kernels/patch_gemm.cuh): u8 pixels,
// fp16 weights and tokens.
#include "cuda/kernels/patch_gemm.cuh"

namespace vlmkern {
template struct PatchGemmVariant<PatchifyDtype::kUInt8, PatchifyDtype::kFloat16>;
}  // namespace vlmkern
