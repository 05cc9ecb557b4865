// One LayerNorm element in fp32, (v - mean) * rstd * gamma + beta, with every rounding explicit
// (no compiler contraction into FMAs that may differ between kernels), so the kernels that
// normalize rows (the shuffle + LayerNorm kernel's write path, the shuffle GEMM's A prologue)
// agree bit for bit. Torch-free.
#pragma once

namespace vlmkern {

__device__ __forceinline__ float layer_norm_value(float v, float mean, float rstd, bool has_gamma,
                                                  float gamma, bool has_beta, float beta) {
  float y = __fmul_rn(__fsub_rn(v, mean), rstd);
  if (has_gamma) return has_beta ? __fmaf_rn(y, gamma, beta) : __fmul_rn(y, gamma);
  return has_beta ? __fadd_rn(y, beta) : y;
}

}  // namespace vlmkern
