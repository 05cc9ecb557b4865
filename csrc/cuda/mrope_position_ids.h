// Torch-free launcher of the mrope_position_ids kernels (implemented in mrope_position_ids.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "common/mrope_position_ids_core.h"

namespace vlmkern {

// Enqueues the count and write kernels on `stream` (no synchronization). counts: (B, 2) int64
// device scratch. Returns the launch status.
cudaError_t launch_mrope_position_ids(const mrope::Args& args, int64_t* counts,
                                      cudaStream_t stream);

}  // namespace vlmkern
