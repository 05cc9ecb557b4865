// The fused GELU-backward GEMM, fp16: dh = gelu'(pre) * (g @ w), the projector's dGELU.
#include "cuda/kernels/gemm_dgelu.cuh"

namespace vlmkern {
template struct GemmDGeluVariant<GemmDtype::kFloat16>;
}  // namespace vlmkern
