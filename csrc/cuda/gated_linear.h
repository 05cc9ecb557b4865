// Torch-free launcher of the gated_linear scalar kernel (cuda/gated_linear.cu): the device-side
// alpha and beta of the fused cuBLASLt GEMM, so the gate is never read on the host.
#pragma once

#include <cuda_runtime_api.h>

namespace vlmkern {

enum class GateDtype : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

// scalars[0] = tanh(float(*gate)), scalars[1] = 1 (one thread; `gate` points at the value).
cudaError_t cuda_gated_linear_scalars(const void* gate, GateDtype dtype, float* scalars,
                                      cudaStream_t stream);

}  // namespace vlmkern
