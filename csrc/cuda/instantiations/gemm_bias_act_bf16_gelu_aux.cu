// One variant of the fused CUTLASS GEMM, bf16: out = gelu(A W^T + bias), aux = A W^T + bias,
// the projector's GEMM1.
#include "cuda/kernels/gemm_bias_act.cuh"

namespace vlmkern {
template struct GemmBiasActVariant<GemmDtype::kBFloat16, GemmActivation::kGelu, true>;
}  // namespace vlmkern
