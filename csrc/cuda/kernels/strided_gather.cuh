// Device code for a permuted copy (GatherPlan): each thread moves kUnroll units of 1..16 bytes,
// writes are contiguous and coalesced, reads follow the plan's strides. No ATen/torch includes.
#pragma once

#include <cstdint>

#include "cuda/kernels/fast_divmod.cuh"

namespace vlmkern {

constexpr int kGatherThreads = 256;
constexpr int kGatherUnroll = 4;

// The element moved per index: a native type of kBytes bytes, so a unit is one load and one store
// (a byte array would be moved as bytes or halves and repacked).
template <int kBytes>
struct GatherUnitOf;
template <> struct GatherUnitOf<1> { using type = unsigned char; };
template <> struct GatherUnitOf<2> { using type = unsigned short; };
template <> struct GatherUnitOf<4> { using type = unsigned int; };
template <> struct GatherUnitOf<8> { using type = uint2; };
template <> struct GatherUnitOf<16> { using type = uint4; };
template <int kBytes>
using GatherUnit = typename GatherUnitOf<kBytes>::type;

template <typename Index, int NDIM>
struct GatherArgs {
  FastDivmod<Index> div[NDIM];  // divisors = output sizes, div[0] unused
  Index size[NDIM];             // output-order sizes
  Index in_stride[NDIM];        // source strides, in units
  Index total;                  // output units
};

template <typename Index, int NDIM>
__device__ __forceinline__ Index gather_source_offset(const GatherArgs<Index, NDIM>& a, Index idx) {
  Index offset = 0;
#pragma unroll
  for (int d = NDIM - 1; d > 0; --d) {
    const Index q = a.div[d].div(idx);
    offset += (idx - q * a.size[d]) * a.in_stride[d];
    idx = q;
  }
  return offset + idx * a.in_stride[0];
}

// in:  strided source, a.size / a.in_stride describe it in output order   (units, global)
// out: (a.total,) contiguous destination                                   (units, global)
template <typename Unit, typename Index, int NDIM>
__global__ void __launch_bounds__(kGatherThreads)
    strided_gather_kernel(const Unit* __restrict__ in, Unit* __restrict__ out,
                          const GatherArgs<Index, NDIM> a) {
  const Index base = static_cast<Index>(blockIdx.x) * (kGatherThreads * kGatherUnroll) + threadIdx.x;
  Unit v[kGatherUnroll];  // (kGatherUnroll,) registers
#pragma unroll
  for (int u = 0; u < kGatherUnroll; ++u) {
    const Index idx = base + u * kGatherThreads;
    if (idx < a.total) v[u] = in[gather_source_offset(a, idx)];
  }
#pragma unroll
  for (int u = 0; u < kGatherUnroll; ++u) {
    const Index idx = base + u * kGatherThreads;
    if (idx < a.total) out[idx] = v[u];
  }
}

}  // namespace vlmkern
