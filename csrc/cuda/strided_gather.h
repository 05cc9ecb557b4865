// Torch-free launcher for a GatherPlan on a CUDA stream (implemented in strided_gather.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "common/strided_gather.h"

namespace vlmkern {

// Enqueues out <- in per `plan` on `stream`; returns the launch status (no synchronization).
cudaError_t cuda_strided_gather(const GatherPlan& plan, const void* in, void* out,
                                cudaStream_t stream);

}  // namespace vlmkern
