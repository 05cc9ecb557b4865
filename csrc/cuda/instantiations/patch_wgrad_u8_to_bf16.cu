// One variant of the implicit-GEMM patch-embedding weight gradient
// (cuda/kernels/patch_wgrad.cuh): u8 pixels, bf16 gradient.
#include "cuda/kernels/patch_wgrad.cuh"

namespace vlmkern {
template struct PatchWgradVariant<PatchifyDtype::kUInt8, PatchifyDtype::kBFloat16>;
}  // namespace vlmkern
