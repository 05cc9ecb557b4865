// Pixel shuffle / unshuffle as a permuted copy: argument checks and the gather plan, shared by the
// CPU and CUDA implementations so both reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "common/strided_gather.h"

namespace vlmkern {

// Largest accepted scale factor (keeps scale*scale far from int64 overflow).
constexpr int64_t kMaxScale = int64_t{1} << 20;

// Checks the arguments and returns the output shape.
// inverse=false (pixel_shuffle):   x (B, H, W, C)       -> (B, H/r, W/r, r*r*C)
// inverse=true  (pixel_unshuffle): y (B, h, w, r*r*C)   -> (B, h*r, w*r, C)
std::vector<int64_t> pixel_shuffle_out_sizes(const at::Tensor& input, int64_t scale, bool inverse);

// The copy that writes `out` (contiguous, shape from pixel_shuffle_out_sizes) from `input`.
GatherPlan pixel_shuffle_gather_plan(const at::Tensor& input, int64_t scale, bool inverse,
                                     const at::Tensor& out);

// Device-independent driver: check, allocate, plan, then `run(plan, in_ptr, out_ptr)`.
template <typename RunGather>
at::Tensor pixel_shuffle_impl(const at::Tensor& input, int64_t scale, bool inverse,
                              RunGather run) {
  const auto sizes = pixel_shuffle_out_sizes(input, scale, inverse);
  at::Tensor out = at::empty(sizes, input.options());
  if (out.numel() == 0) return out;
  const GatherPlan plan = pixel_shuffle_gather_plan(input, scale, inverse, out);
  run(plan, input.const_data_ptr(), out.mutable_data_ptr());
  return out;
}

}  // namespace vlmkern
