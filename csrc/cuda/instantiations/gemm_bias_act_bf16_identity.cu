// One variant of the fused CUTLASS GEMM, bf16: out = A W^T + bias,
// the projector's GEMM2 (and GEMM1 for activations without a compiled epilogue).
#include "cuda/kernels/gemm_bias_act.cuh"

namespace vlmkern {
template struct GemmBiasActVariant<GemmDtype::kBFloat16, GemmActivation::kIdentity, false>;
}  // namespace vlmkern
