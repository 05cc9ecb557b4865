// Launches position_rows_kernel (cuda/kernels/position_rows.cuh) for fp32 / fp16 / bf16.
#include "cuda/kernels/position_rows.cuh"
#include "cuda/position_rows.h"

namespace vlmkern {
namespace {

template <typename T>
cudaError_t launch(const PositionRowsParams& p, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(p.n < 16384 ? p.n : 16384);  // grid-strides rows
  position_rows_kernel<T><<<blocks, kPositionRowsThreads, 0, stream>>>(
      static_cast<const T*>(p.table), p.index, p.weight, static_cast<const T*>(p.bias),
      static_cast<T*>(p.out), p.n, p.d);
  return cudaGetLastError();
}

}  // namespace

cudaError_t cuda_position_rows(const PositionRowsParams& p, cudaStream_t stream) {
  if (p.n <= 0 || p.d <= 0) return cudaSuccess;
  switch (p.dtype) {
    case PositionRowsDtype::kFloat32:
      return launch<float>(p, stream);
    case PositionRowsDtype::kFloat16:
      return launch<__half>(p, stream);
    case PositionRowsDtype::kBFloat16:
      return launch<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vlmkern
