// Torch-free description of a permuted copy: read a strided N-D view, write it contiguously.
// Pixel shuffle / unshuffle (and later the Qwen 2x2 merge) are all such copies; CPU and CUDA run
// the same plan. Adjacent dims that are contiguous in the source are merged to save index math.
#pragma once

#include <cstdint>

namespace vlmkern {

constexpr int kMaxGatherDims = 6;

// out[flat index over sizes, row-major] = in[sum_d coord_d * in_strides[d]]  (units of unit_bytes)
struct GatherPlan {
  int ndim = 0;                           // 1..kMaxGatherDims after coalescing
  int unit_bytes = 1;                     // bytes moved per index step: element size, or up to 16
  int64_t sizes[kMaxGatherDims] = {};     // output-order logical sizes
  int64_t in_strides[kMaxGatherDims] = {};  // source strides for those dims, in units
  int64_t total = 0;                      // product of sizes (units)
  int64_t max_in_offset = 0;              // largest source offset touched (units)
};

// Builds a plan from element sizes/strides (output order), merges mergeable neighbours, then
// widens the unit to the largest power of two <= 16 bytes that keeps every access aligned.
inline GatherPlan make_gather_plan(int ndim, const int64_t* sizes, const int64_t* in_strides,
                                   int elem_bytes, uintptr_t in_addr, uintptr_t out_addr) {
  GatherPlan p;
  p.unit_bytes = elem_bytes;
  p.total = 1;
  for (int d = 0; d < ndim; ++d) p.total *= sizes[d];
  // Drop size-1 dims and merge d-1 into d when the source walks them as one run.
  for (int d = 0; d < ndim; ++d) {
    if (sizes[d] == 1) continue;
    if (p.ndim > 0 && p.in_strides[p.ndim - 1] == sizes[d] * in_strides[d]) {
      p.sizes[p.ndim - 1] *= sizes[d];
      p.in_strides[p.ndim - 1] = in_strides[d];
      continue;
    }
    p.sizes[p.ndim] = sizes[d];
    p.in_strides[p.ndim] = in_strides[d];
    ++p.ndim;
  }
  if (p.ndim == 0) {  // a single element (or an empty copy): one dim of the total size
    p.ndim = 1;
    p.sizes[0] = p.total;
    p.in_strides[0] = 1;
  }
  // Widen the unit when the innermost dim is contiguous in the source.
  if (p.total > 0 && p.in_strides[p.ndim - 1] == 1) {
    const int64_t inner_bytes = p.sizes[p.ndim - 1] * elem_bytes;
    int unit = 16;
    while (unit > elem_bytes) {
      bool ok = inner_bytes % unit == 0 && in_addr % unit == 0 && out_addr % unit == 0;
      for (int d = 0; d + 1 < p.ndim && ok; ++d) ok = (p.in_strides[d] * elem_bytes) % unit == 0;
      if (ok) break;
      unit /= 2;
    }
    if (unit > elem_bytes) {
      const int64_t f = unit / elem_bytes;
      p.sizes[p.ndim - 1] /= f;
      for (int d = 0; d + 1 < p.ndim; ++d) p.in_strides[d] /= f;
      p.total /= f;
      p.unit_bytes = unit;
    }
  }
  for (int d = 0; d < p.ndim; ++d) {
    if (p.sizes[d] > 0) p.max_in_offset += (p.sizes[d] - 1) * p.in_strides[d];
  }
  return p;
}

}  // namespace vlmkern
