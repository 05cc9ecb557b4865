// Helpers shared by the image and packed patch-embedding composites (common/patch_embed*.cpp):
// argument checks worded like the fake kernels in python/vlmkern/ops/patch_embed.py, and the
// folding of the pixel normalization into the GEMM weights.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "common/checks.h"
#include "common/patch_embed.h"

namespace vlmkern::patch_embed_detail {

// "torch.float32", as Python prints the dtype (so both kernels raise the same words).
std::string dtype_name(at::ScalarType t);

// weight: float dtype; pixels: uint8 or weight's dtype; every given tensor on pixels' device.
void check_dtype_device(const char* op, const at::Tensor& pixels, const char* pixels_name,
                        const at::Tensor& weight);

// An optional (D,) or (L, D) parameter: rank, weight's dtype and device, width D.
void check_param(const char* op, const std::optional<at::Tensor>& t, const char* name,
                 int64_t rank, const char* layout, const at::Tensor& weight);

// mean / std: C values each, std nonzero.
void check_norm(const char* op, const PixelNorm& norm, int64_t channels);

// Folds `norm` into weight (D, C, R) (R = the K/C inputs of one channel) and bias (D,) in float64:
// W' = W * scale[c], b' = b - sum_{c,r} W * offset[c]; returns (W' as (D, C*R), b' or undefined)
// in weight's dtype. Without normalization returns weight.view(D, K) and bias unchanged.
std::pair<at::Tensor, at::Tensor> fold_weight(const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const PixelNorm& norm);

// x (M, C, R) or (M, R, C) patch rows (channel_dim 1 or 2) -> normalized copy, x * scale[c] -
// offset[c] in float32 (float64 for double) cast back: the conv input of normalize-then-embed.
at::Tensor normalize_rows(const at::Tensor& x, const PixelNorm& norm, int64_t channel_dim);

// Image mode, checked: the number of output tokens per image, [1 +] (H/P)(W/P).
int64_t image_tokens(const at::Tensor& pixels, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& pos_embed,
                     const std::optional<at::Tensor>& cls_token, const PixelNorm& norm,
                     bool channels_last, std::string_view pos_interp);

// Image mode into `out` (B, T, D), each (T, D) block contiguous (a slice of a packed output).
void patch_embed_forward_into(const at::Tensor& out, const at::Tensor& pixels,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& pos_embed,
                              const std::optional<at::Tensor>& cls_token, const PixelNorm& norm,
                              bool channels_last, std::string_view pos_interp);

// blocks (B, L, D) = rows (B, L, K) @ w (D, K)^T + addend (L, D) for every b: the CUDA build's
// cuBLASLt GEMM with the addend in its epilogue where it takes the operands, else ATen's baddbmm.
void addend_gemm(const at::Tensor& blocks, const at::Tensor& rows, const at::Tensor& w,
                 const at::Tensor& addend);

// The CUDA build's position-rows hook (set_cuda_position_rows), nullptr without one.
PositionRowsFn cuda_position_rows_hook();

// The CUDA build's position-GEMM hook (set_cuda_position_gemm), nullptr without one.
PositionGemmFn cuda_position_gemm_hook();

// Empty (0,) placeholder for an unrequested gradient.
at::Tensor no_grad_output(const at::Tensor& like);

}  // namespace vlmkern::patch_embed_detail
