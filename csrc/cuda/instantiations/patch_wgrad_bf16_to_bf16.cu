// One variant of the implicit-GEMM patch-embedding weight gradient
// (cuda/kernels/patch_wgrad.cuh): bf16 pixels, bf16 gradient.
#include "cuda/kernels/patch_wgrad.cuh"

namespace vlmkern {
template struct PatchWgradVariant<PatchifyDtype::kBFloat16, PatchifyDtype::kBFloat16>;
}  // namespace vlmkern
