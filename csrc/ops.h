// Per-device entry points of every vlmkern op (registered in cpu/*.cpp and cuda/*.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace vlmkern {

// pixel_shuffle: x (B, H, W, C) -> (B, H/r, W/r, r*r*C); pixel_unshuffle is its inverse.
at::Tensor pixel_shuffle_cpu(const at::Tensor& x, int64_t scale);
at::Tensor pixel_unshuffle_cpu(const at::Tensor& y, int64_t scale);
at::Tensor pixel_shuffle_cuda(const at::Tensor& x, int64_t scale);
at::Tensor pixel_unshuffle_cuda(const at::Tensor& y, int64_t scale);

}  // namespace vlmkern
