// Per-device entry points of every vlmkern op (registered in cpu/*.cpp and cuda/*.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace vlmkern {

// pixel_shuffle: x (B, H, W, C) -> (B, H/r, W/r, r*r*C); pixel_unshuffle is its inverse.
at::Tensor pixel_shuffle_cpu(const at::Tensor& x, int64_t scale);
at::Tensor pixel_unshuffle_cpu(const at::Tensor& y, int64_t scale);
at::Tensor pixel_shuffle_cuda(const at::Tensor& x, int64_t scale);
at::Tensor pixel_unshuffle_cuda(const at::Tensor& y, int64_t scale);

// rope: q (B, S, Hq, D), k (B, S, Hk, D) rotated by angles float(positions[freq_axis[f], b, s]) *
// inv_freq[f] (see common/rope_params.h); rope_backward rotates by -angle; rope_ works in place.
std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& positions,
                                            at::ArrayRef<double> inv_freq,
                                            at::IntArrayRef freq_axis, double scale);
std::tuple<at::Tensor, at::Tensor> rope_backward_cpu(const at::Tensor& grad_q,
                                                     const at::Tensor& grad_k,
                                                     const at::Tensor& positions,
                                                     at::ArrayRef<double> inv_freq,
                                                     at::IntArrayRef freq_axis, double scale);
void rope_inplace_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                      at::ArrayRef<double> inv_freq, at::IntArrayRef freq_axis, double scale);
std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& positions,
                                             at::ArrayRef<double> inv_freq,
                                             at::IntArrayRef freq_axis, double scale);
std::tuple<at::Tensor, at::Tensor> rope_backward_cuda(const at::Tensor& grad_q,
                                                      const at::Tensor& grad_k,
                                                      const at::Tensor& positions,
                                                      at::ArrayRef<double> inv_freq,
                                                      at::IntArrayRef freq_axis, double scale);
void rope_inplace_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                       at::ArrayRef<double> inv_freq, at::IntArrayRef freq_axis, double scale);
// HF calling convention: cos, sin (B or 1, S, R); inverse=true is the backward.
std::tuple<at::Tensor, at::Tensor> rope_cos_sin_cpu(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& cos, const at::Tensor& sin,
                                                    bool inverse);
std::tuple<at::Tensor, at::Tensor> rope_cos_sin_cuda(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& cos, const at::Tensor& sin,
                                                     bool inverse);
// mrope_position_ids: tokens (B, S) -> (position_ids (3, B, S), rope_deltas (B, 1)), both int64.
std::tuple<at::Tensor, at::Tensor> mrope_position_ids_cpu(
    const at::Tensor& tokens, const std::optional<at::Tensor>& attention_mask,
    const std::optional<at::Tensor>& image_grid_thw,
    const std::optional<at::Tensor>& video_grid_thw,
    const std::optional<at::Tensor>& video_intervals, int64_t spatial_merge_size,
    int64_t image_token, int64_t video_token, bool split_video_frames,
    std::string_view text_after_video);
std::tuple<at::Tensor, at::Tensor> mrope_position_ids_cuda(
    const at::Tensor& tokens, const std::optional<at::Tensor>& attention_mask,
    const std::optional<at::Tensor>& image_grid_thw,
    const std::optional<at::Tensor>& video_grid_thw,
    const std::optional<at::Tensor>& video_intervals, int64_t spatial_merge_size,
    int64_t image_token, int64_t video_token, bool split_video_frames,
    std::string_view text_after_video);
// patch_embed: image mode (B, C, H, W) -> (B, [1 +] L, D) and packed Qwen mode (N, K) + grid_thw
// -> (tokens (N, D), cu_seqlens); both devices run the composite of common/patch_embed.h.
at::Tensor patch_embed_cpu(const at::Tensor& pixels, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& pos_embed,
                       const std::optional<at::Tensor>& cls_token,
                       std::optional<at::ArrayRef<double>> mean,
                       std::optional<at::ArrayRef<double>> std, double rescale, bool channels_last,
                       std::string_view pos_interp);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_backward_cpu(
    const at::Tensor& grad, const at::Tensor& pixels, const at::Tensor& weight, bool has_bias,
    const std::optional<at::Tensor>& pos_embed, bool has_cls,
    std::optional<at::ArrayRef<double>> mean,
    std::optional<at::ArrayRef<double>> std, double rescale, bool channels_last,
    std::string_view pos_interp, std::array<bool, 5> output_mask);
std::tuple<at::Tensor, at::Tensor> patch_embed_packed_cpu(
    const at::Tensor& patches, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& grid_thw, const std::optional<at::Tensor>& pos_embed,
    int64_t spatial_merge_size, std::optional<at::ArrayRef<double>> mean,
    std::optional<at::ArrayRef<double>> std, double rescale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_packed_backward_cpu(
    const at::Tensor& grad, const at::Tensor& patches, const at::Tensor& weight, bool has_bias,
    const at::Tensor& grid_thw, const std::optional<at::Tensor>& pos_embed,
    int64_t spatial_merge_size, std::optional<at::ArrayRef<double>> mean,
    std::optional<at::ArrayRef<double>> std, double rescale, std::array<bool, 4> output_mask);
at::Tensor patch_embed_cuda(const at::Tensor& pixels, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& pos_embed,
                       const std::optional<at::Tensor>& cls_token,
                       std::optional<at::ArrayRef<double>> mean,
                       std::optional<at::ArrayRef<double>> std, double rescale, bool channels_last,
                       std::string_view pos_interp);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_backward_cuda(
    const at::Tensor& grad, const at::Tensor& pixels, const at::Tensor& weight, bool has_bias,
    const std::optional<at::Tensor>& pos_embed, bool has_cls,
    std::optional<at::ArrayRef<double>> mean,
    std::optional<at::ArrayRef<double>> std, double rescale, bool channels_last,
    std::string_view pos_interp, std::array<bool, 5> output_mask);
std::tuple<at::Tensor, at::Tensor> patch_embed_packed_cuda(
    const at::Tensor& patches, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& grid_thw, const std::optional<at::Tensor>& pos_embed,
    int64_t spatial_merge_size, std::optional<at::ArrayRef<double>> mean,
    std::optional<at::ArrayRef<double>> std, double rescale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_packed_backward_cuda(
    const at::Tensor& grad, const at::Tensor& patches, const at::Tensor& weight, bool has_bias,
    const at::Tensor& grid_thw, const std::optional<at::Tensor>& pos_embed,
    int64_t spatial_merge_size, std::optional<at::ArrayRef<double>> mean,
    std::optional<at::ArrayRef<double>> std, double rescale, std::array<bool, 4> output_mask);
std::tuple<at::Tensor, at::Tensor> patch_embed_varlen_cpu(
    at::TensorList pixels, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& cls_token,
    std::optional<at::ArrayRef<double>> mean, std::optional<at::ArrayRef<double>> std,
    double rescale, bool channels_last, std::string_view pos_interp);
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
patch_embed_varlen_backward_cpu(const at::Tensor& grad, at::TensorList pixels,
                               const at::Tensor& weight, bool has_bias,
                               const std::optional<at::Tensor>& pos_embed, bool has_cls,
                               std::optional<at::ArrayRef<double>> mean,
                               std::optional<at::ArrayRef<double>> std, double rescale,
                               bool channels_last, std::string_view pos_interp,
                               std::array<bool, 5> output_mask);
std::tuple<at::Tensor, at::Tensor> patch_embed_varlen_cuda(
    at::TensorList pixels, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& cls_token,
    std::optional<at::ArrayRef<double>> mean, std::optional<at::ArrayRef<double>> std,
    double rescale, bool channels_last, std::string_view pos_interp);
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
patch_embed_varlen_backward_cuda(const at::Tensor& grad, at::TensorList pixels,
                               const at::Tensor& weight, bool has_bias,
                               const std::optional<at::Tensor>& pos_embed, bool has_cls,
                               std::optional<at::ArrayRef<double>> mean,
                               std::optional<at::ArrayRef<double>> std, double rescale,
                               bool channels_last, std::string_view pos_interp,
                               std::array<bool, 5> output_mask);

// mlp_projector: (out, hidden, act, mean, rstd), see torch_bindings.cpp; its backward: seven gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_projector_cpu(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
    std::string_view activation, std::string_view norm, std::string_view norm_position, double eps,
    int64_t shuffle, int64_t merge);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mlp_projector_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                          const std::optional<at::Tensor>& w2,
                          const std::optional<at::Tensor>& norm_weight,
                          const std::optional<at::Tensor>& norm_bias, const at::Tensor& hidden,
                          const at::Tensor& act, const at::Tensor& mean, const at::Tensor& rstd,
                          std::string_view activation, std::string_view norm,
                          std::string_view norm_position, double eps, int64_t shuffle,
                          int64_t merge, std::array<bool, 7> output_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_projector_cuda(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
    std::string_view activation, std::string_view norm, std::string_view norm_position, double eps,
    int64_t shuffle, int64_t merge);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mlp_projector_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                          const std::optional<at::Tensor>& w2,
                          const std::optional<at::Tensor>& norm_weight,
                          const std::optional<at::Tensor>& norm_bias, const at::Tensor& hidden,
                          const at::Tensor& act, const at::Tensor& mean, const at::Tensor& rstd,
                          std::string_view activation, std::string_view norm,
                          std::string_view norm_position, double eps, int64_t shuffle,
                          int64_t merge, std::array<bool, 7> output_mask);
// gated_linear: residual (..., N) + tanh(gate) * (x (..., K) @ weight (N, K)^T + bias (N)).
at::Tensor gated_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& gate,
                            const at::Tensor& residual, const std::optional<at::Tensor>& bias);
at::Tensor gated_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& gate,
                             const at::Tensor& residual, const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& gate, const std::optional<at::Tensor>& bias,
    std::array<bool, 4> output_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& gate, const std::optional<at::Tensor>& bias,
    std::array<bool, 4> output_mask);
// cross_attention: q (B, Sq, Hq, D), k / v (B, Sk, Hk, D) -> (out (B, Sq, Hq, D), lse (B, Hq, Sq));
// visibility and layouts as in common/cross_attention.h. The backward returns (dq, dk, dv).
std::tuple<at::Tensor, at::Tensor> cross_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_ranges, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& prefix_len,
    std::optional<double> scale, std::string_view masked_rows);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const std::optional<at::Tensor>& kv_ranges, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& prefix_len,
    std::optional<double> scale, std::string_view masked_rows);
// CUDA: forward and backward take fp16 / bf16 and D in {64, 72, 80, 96, 128} (flash-attention 2
// style kernels, deterministic).
std::tuple<at::Tensor, at::Tensor> cross_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_ranges, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& prefix_len,
    std::optional<double> scale, std::string_view masked_rows);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const std::optional<at::Tensor>& kv_ranges, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& prefix_len,
    std::optional<double> scale, std::string_view masked_rows);
// mllama_kv_ranges: tile mask (B, S, M, T) -> int32 (B, S, ceil(M*T/2), 2) visible key ranges.
at::Tensor mllama_kv_ranges_cpu(const at::Tensor& mask, int64_t num_vision_tokens);
at::Tensor mllama_kv_ranges_cuda(const at::Tensor& mask, int64_t num_vision_tokens);

}  // namespace vlmkern
