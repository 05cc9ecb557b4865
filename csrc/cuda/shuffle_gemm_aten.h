// The shuffle GEMM's parameters (cuda/shuffle_gemm.h) from ATen tensors, for the CUDA glue that
// launches it: the projector's shuffled / normalized GEMM1 (cuda/mlp_projector.cpp) and packed
// Qwen3-VL patch embedding's position GEMM (cuda/patch_embed.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "cuda/shuffle_gemm.h"

namespace vlmkern {

// x (B, H, W, C) read at shuffle factor r (r = 1: its rows as they are), w (N, r*r*C), bias b;
// out, the norm and the position table left unset. nullopt when the kernel cannot take these
// dtypes or layouts: fp16 / bf16 throughout, x 4-D with unit channel stride and C < 2^31, w and
// b contiguous. The sizes and alignments the kernel needs are shuffle_gemm_unsupported's to check.
inline std::optional<ShuffleGemmParams> shuffle_gemm_params(const at::Tensor& x, int64_t r,
                                                            const at::Tensor& w,
                                                            const std::optional<at::Tensor>& b) {
  const auto dt = x.scalar_type();
  if ((dt != at::kBFloat16 && dt != at::kHalf) || x.dim() != 4 || x.stride(3) != 1 ||
      x.size(3) > INT32_MAX || r < 1 || r > INT32_MAX || w.scalar_type() != dt ||
      !w.is_contiguous() || (b && (b->scalar_type() != dt || !b->is_contiguous()))) {
    return std::nullopt;
  }
  ShuffleGemmParams p;
  p.dtype = dt == at::kBFloat16 ? GemmDtype::kBFloat16 : GemmDtype::kFloat16;
  p.x = x.const_data_ptr();
  p.batch = x.size(0);
  p.h = x.size(1);
  p.w = x.size(2);
  p.c = static_cast<int>(x.size(3));
  p.r = static_cast<int>(r);
  p.stride_b = x.size(0) == 1 ? 0 : x.stride(0);  // a size-1 dim's stride is never used
  p.stride_h = x.stride(1);
  p.stride_w = x.stride(2);
  p.weight = w.const_data_ptr();
  p.n = w.size(0);
  p.bias = b ? b->const_data_ptr() : nullptr;
  p.device = x.device().index();
  return p;
}

}  // namespace vlmkern
