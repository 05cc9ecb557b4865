// The fused GELU-backward GEMM, bf16: dh = gelu'(pre) * (g @ w), the projector's dGELU.
#include "cuda/kernels/gemm_dgelu.cuh"

namespace vlmkern {
template struct GemmDGeluVariant<GemmDtype::kBFloat16>;
}  // namespace vlmkern
