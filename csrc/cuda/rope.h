// Torch-free launcher for the table-driven RoPE kernel (implemented in rope.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "common/rope_params.h"

namespace vlmkern {

// Enqueues the rotation described by `p` on `stream`; returns the launch status (no sync).
cudaError_t cuda_rope(const RopeParams& p, cudaStream_t stream);

}  // namespace vlmkern
