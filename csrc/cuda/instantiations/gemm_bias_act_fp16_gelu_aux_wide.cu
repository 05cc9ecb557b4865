// One variant of the fused CUTLASS GEMM, fp16, cooperative wide (128 x 256 tiles, 2 x 1 cluster):
// out = gelu(A W^T + bias), aux = A W^T + bias (VLMKERN_PROJECTOR_GEMM=cutlass_wide).
#include "cuda/kernels/gemm_bias_act.cuh"

namespace vlmkern {
template struct GemmBiasActVariant<GemmDtype::kFloat16, GemmActivation::kGelu, true,
                                   GemmSchedule::kCooperativeWide>;
}  // namespace vlmkern
