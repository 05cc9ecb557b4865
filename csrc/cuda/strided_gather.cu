// Launches strided_gather_kernel for a GatherPlan: picks the unit width (1..16 bytes), 32- or
// 64-bit indexing, and the number of index dims (3 or 6, padded with size-1 dims).
#include "cuda/kernels/strided_gather.cuh"
#include "cuda/strided_gather.h"

namespace vlmkern {
namespace {

template <typename Unit, typename Index, int NDIM>
cudaError_t launch(const GatherPlan& p, const void* in, void* out, cudaStream_t stream) {
  GatherArgs<Index, NDIM> a;
  const int pad = NDIM - p.ndim;  // leading size-1 dims
  for (int d = 0; d < NDIM; ++d) {
    const bool real = d >= pad;
    a.size[d] = static_cast<Index>(real ? p.sizes[d - pad] : 1);
    a.in_stride[d] = static_cast<Index>(real ? p.in_strides[d - pad] : 0);
    a.div[d] = FastDivmod<Index>(a.size[d]);
  }
  a.total = static_cast<Index>(p.total);
  const int64_t per_block = int64_t{kGatherThreads} * kGatherUnroll;
  const int64_t blocks = (p.total + per_block - 1) / per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  strided_gather_kernel<Unit, Index, NDIM><<<static_cast<unsigned>(blocks), kGatherThreads, 0,
                                             stream>>>(static_cast<const Unit*>(in),
                                                       static_cast<Unit*>(out), a);
  return cudaGetLastError();
}

template <typename Unit>
cudaError_t launch_unit(const GatherPlan& p, const void* in, void* out, cudaStream_t stream) {
  // 32-bit indexing while every index and source offset (plus one unroll step) stays < 2^31.
  const int64_t limit = int64_t{1} << 31;
  const int64_t slack = int64_t{kGatherThreads} * kGatherUnroll;
  const bool small = p.total + slack < limit && p.max_in_offset < limit;
  if (p.ndim <= 3) {
    return small ? launch<Unit, uint32_t, 3>(p, in, out, stream)
                 : launch<Unit, uint64_t, 3>(p, in, out, stream);
  }
  return small ? launch<Unit, uint32_t, 6>(p, in, out, stream)
               : launch<Unit, uint64_t, 6>(p, in, out, stream);
}

}  // namespace

cudaError_t cuda_strided_gather(const GatherPlan& plan, const void* in, void* out,
                                cudaStream_t stream) {
  if (plan.total == 0) return cudaSuccess;
  switch (plan.unit_bytes) {
    case 1: return launch_unit<GatherUnit<1>>(plan, in, out, stream);
    case 2: return launch_unit<GatherUnit<2>>(plan, in, out, stream);
    case 4: return launch_unit<GatherUnit<4>>(plan, in, out, stream);
    case 8: return launch_unit<GatherUnit<8>>(plan, in, out, stream);
    case 16: return launch_unit<GatherUnit<16>>(plan, in, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace vlmkern
