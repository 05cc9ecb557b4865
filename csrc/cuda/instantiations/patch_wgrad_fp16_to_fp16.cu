// One variant of the implicit-GEMM patch-embedding weight gradient
// (cuda/kernels/patch_wgrad.cuh): fp16 pixels, fp16 gradient.
#include "cuda/kernels/patch_wgrad.cuh"

namespace vlmkern {
template struct PatchWgradVariant<PatchifyDtype::kFloat16, PatchifyDtype::kFloat16>;
}  // namespace vlmkern
