// Patch embedding (stride = kernel conv as a GEMM): argument checks and the device-independent
// composite of ATen ops that CPU and CUDA both register until the implicit-GEMM kernel lands.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace vlmkern {

// Per-channel affine on the pixels, x = p * rescale / std[c] - mean[c] / std[c], folded into the
// GEMM weights (exact: stride = kernel, no padding). Identity when mean, std absent, rescale 1.
struct PixelNorm {
  std::optional<at::ArrayRef<double>> mean;
  std::optional<at::ArrayRef<double>> std;
  double rescale = 1.0;

  bool active() const { return mean.has_value() || std.has_value() || rescale != 1.0; }
  double scale(int64_t c) const { return rescale / (std ? (*std)[c] : 1.0); }
  double offset(int64_t c) const { return mean ? (*mean)[c] / (std ? (*std)[c] : 1.0) : 0.0; }
};

// Image mode. pixels (B, C, H, W) or, channels_last, (B, H, W, C); float (weight's dtype) or
// uint8. weight (D, C, P, P), bias (D,), pos_embed (L, D) with L = [1 +] S*S (bicubic-resized,
// align_corners=False, to the (H/P, W/P) grid unless pos_interp == "none"), cls_token (D,).
// Returns (B, [1 +] H/P * W/P, D) in weight's dtype, CLS row first.
at::Tensor patch_embed_forward(const at::Tensor& pixels, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& pos_embed,
                               const std::optional<at::Tensor>& cls_token, const PixelNorm& norm,
                               bool channels_last, std::string_view pos_interp);

// Its backward: (grad_pixels, grad_weight, grad_bias, grad_pos_embed, grad_cls_token); an output
// whose output_mask entry is false is an empty (0,) tensor. grad_pixels needs float pixels.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_backward(
    const at::Tensor& grad, const at::Tensor& pixels, const at::Tensor& weight, bool has_bias,
    const std::optional<at::Tensor>& pos_embed, bool has_cls, const PixelNorm& norm,
    bool channels_last, std::string_view pos_interp, std::array<bool, 5> output_mask);

// The CUDA build's patch-matrix kernel (cuda/patch_embed.cpp installs it when the library loads;
// a CPU-only build has none): fills out (B*gh*gw, kp) from pixels (B, C, H, W) or, channels_last,
// (B, H, W, C), P-sized patches, zero columns from C*P*P to kp. false: not handled (the caller
// uses ATen's copy). Image mode on CUDA devices only.
using PatchMatrixFn = bool (*)(const at::Tensor& pixels, bool channels_last, int64_t patch,
                               int64_t gh, int64_t gw, const at::Tensor& out);
void set_cuda_patch_matrix(PatchMatrixFn fn);

// The CUDA build's GEMM with a per-token addend (cuda/patch_embed.cpp, on cuBLASLt): blocks
// (B, L, D) = rows (B, L, kp) @ w (D, kp)^T + addend (L, D), the addend read once per image in
// the epilogue (ATen's baddbmm would first copy it, broadcast, into blocks). blocks may be a
// strided view (e.g. skipping the CLS rows). false: not handled (the caller uses baddbmm).
using AddendGemmFn = bool (*)(const at::Tensor& blocks, const at::Tensor& rows,
                              const at::Tensor& w, const at::Tensor& addend);
void set_cuda_addend_gemm(AddendGemmFn fn);

// The CUDA build's implicit-GEMM patch embedding (cuda/patch_embed.cpp, cuda/patch_gemm.h):
// blocks (B, L, D) = patches(pixels) @ w (D, kp)^T + addend, the patch rows gathered from pixels
// inside the GEMM (no patch matrix in global memory); addend (L, D), (D,) or undefined. false:
// not handled (not selected, or the kernel does not take the inputs; the caller builds the patch
// matrix and calls the AddendGemmFn).
using ImplicitPatchGemmFn = bool (*)(const at::Tensor& pixels, bool channels_last, int64_t patch,
                                     int64_t gh, int64_t gw, const at::Tensor& w,
                                     const at::Tensor& addend, const at::Tensor& blocks);
void set_cuda_implicit_patch_gemm(ImplicitPatchGemmFn fn);

// The CUDA build's implicit-GEMM weight gradient (cuda/patch_embed.cpp, cuda/patch_wgrad.h):
// (D, kp) = tokens (B, L, D)^T-contracted with the (normalized, zero-padded to kp) patch rows of
// pixels, gathered inside the GEMM (no patch matrix in global memory), in tokens' dtype,
// contiguous. Undefined: not handled (the caller builds the patch matrix and runs mm).
using ImplicitPatchWgradFn = at::Tensor (*)(const at::Tensor& pixels, bool channels_last,
                                            int64_t patch, int64_t gh, int64_t gw,
                                            const at::Tensor& tokens, int64_t kp,
                                            const PixelNorm& norm);
void set_cuda_implicit_patch_wgrad(ImplicitPatchWgradFn fn);

// The CUDA build's position-rows kernel (cuda/position_rows.h) for packed mode's bilinear table:
// out (N, D) = dtype(dtype(sum_k table[index[k, r]] * weight[k, r]) + bias) per token r, table
// (S*S, D) and out in weight's dtype, index (4, N) int64, weight (4, N) fp32, bias (D,) or
// undefined. false: not handled (the caller gathers with ATen).
using PositionRowsFn = bool (*)(const at::Tensor& table, const at::Tensor& index,
                                const at::Tensor& weight, const at::Tensor& bias,
                                const at::Tensor& out);
void set_cuda_position_rows(PositionRowsFn fn);

// The CUDA build's position GEMM (cuda/patch_embed.cpp, VLMKERN_PATCH_EMBED_GEMM=implicit): tokens
// (N, D) = x (N, K) @ w (D, K)^T + the PositionRowsFn's addend, that addend computed in the GEMM's
// epilogue from the taps (never written as an (N, D) tensor). Same arguments and dtypes as the
// PositionRowsFn. false: not handled (not selected, or the kernel does not take the inputs).
using PositionGemmFn = bool (*)(const at::Tensor& tokens, const at::Tensor& x, const at::Tensor& w,
                                const at::Tensor& table, const at::Tensor& index,
                                const at::Tensor& weight, const at::Tensor& bias);
void set_cuda_position_gemm(PositionGemmFn fn);

// Packed mode (Qwen2-VL / 2.5-VL / 3-VL). patches (N, C*T*P*P) rows in (C, T, ph, pw) order,
// weight (D, C, T, P, P), bias (D,), grid_thw (n, 3) int, pos_embed (S*S, D) resampled bilinearly
// (align_corners=True) to each image's (h, w) grid in spatial-merge-block order (Qwen3-VL).
// Returns (tokens (N, D) in weight's dtype, cu_seqlens (n + 1,) int32 per grid_thw row).
// check_grid=true (CPU) validates grid_thw's values on the host; CUDA never reads them back.
std::tuple<at::Tensor, at::Tensor> patch_embed_packed_forward(
    const at::Tensor& patches, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& grid_thw, const std::optional<at::Tensor>& pos_embed,
    int64_t spatial_merge_size, const PixelNorm& norm, bool check_grid);

// Its backward: (grad_patches, grad_weight, grad_bias, grad_pos_embed), masked as above.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_packed_backward(
    const at::Tensor& grad, const at::Tensor& patches, const at::Tensor& weight, bool has_bias,
    const at::Tensor& grid_thw, const std::optional<at::Tensor>& pos_embed,
    int64_t spatial_merge_size, const PixelNorm& norm, std::array<bool, 4> output_mask);

// A list of images (C, H_i, W_i) / (H_i, W_i, C) of different sizes: each embedded as in image
// mode (positions resized to its own grid), packed -> (tokens (sum T_i, D), cu_seqlens (n + 1,)).
std::tuple<at::Tensor, at::Tensor> patch_embed_varlen_forward(
    at::TensorList images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& cls_token,
    const PixelNorm& norm, bool channels_last, std::string_view pos_interp);

// Its backward: ([d image_i] (empty unless requested), d weight, d bias, d pos_embed, d cls).
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
patch_embed_varlen_backward(const at::Tensor& grad, at::TensorList images,
                            const at::Tensor& weight, bool has_bias,
                            const std::optional<at::Tensor>& pos_embed, bool has_cls,
                            const PixelNorm& norm, bool channels_last,
                            std::string_view pos_interp, std::array<bool, 5> output_mask);

}  // namespace vlmkern
