// One variant of the sm_80+ fused CUTLASS GEMM, fp16: out = A W^T + bias, the projector's GEMM2.
#include "cuda/kernels/gemm_bias_act_sm80.cuh"

namespace vlmkern {
template struct GemmBiasActSm80<GemmDtype::kFloat16, GemmActivation::kIdentity, false>;
}  // namespace vlmkern
