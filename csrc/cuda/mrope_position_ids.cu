// Launches the two mrope_position_ids kernels: per-row block counts, then (after every row's count
// is known, so each row knows which grid rows it consumes) the positions. One CTA per row.
#include "cuda/kernels/mrope_position_ids.cuh"
#include "cuda/mrope_position_ids.h"

namespace vlmkern {

cudaError_t launch_mrope_position_ids(const mrope::Args& args, int64_t* counts,
                                      cudaStream_t stream) {
  if (args.batch == 0) return cudaSuccess;
  if (args.batch > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const unsigned rows = static_cast<unsigned>(args.batch);
  return mrope::with_kinds(args, [&](const auto& kind) {
    mrope_position_ids_count_kernel<<<rows, kMropeThreads, 0, stream>>>(args, kind, counts);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
    mrope_position_ids_write_kernel<<<rows, kMropeThreads, 0, stream>>>(args, kind, counts);
    return cudaGetLastError();
  });
}

}  // namespace vlmkern
