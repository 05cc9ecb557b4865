// One variant of the fused CUTLASS GEMM, bf16, pingpong schedule: out = gelu(A W^T + bias),
// aux = A W^T + bias, the projector's GEMM1 (VLMKERN_PROJECTOR_GEMM=cutlass_pingpong).
#include "cuda/kernels/gemm_bias_act.cuh"

namespace vlmkern {
template struct GemmBiasActVariant<GemmDtype::kBFloat16, GemmActivation::kGelu, true,
                                   GemmSchedule::kPingpong>;
}  // namespace vlmkern
