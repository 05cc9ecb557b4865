// Per-device entry points of every vlmkern op (registered in cpu/*.cpp and cuda/*.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace vlmkern {

// pixel_shuffle: x (B, H, W, C) -> (B, H/r, W/r, r*r*C); pixel_unshuffle is its inverse.
at::Tensor pixel_shuffle_cpu(const at::Tensor& x, int64_t scale);
at::Tensor pixel_unshuffle_cpu(const at::Tensor& y, int64_t scale);
at::Tensor pixel_shuffle_cuda(const at::Tensor& x, int64_t scale);
at::Tensor pixel_unshuffle_cuda(const at::Tensor& y, int64_t scale);

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

}  // namespace vlmkern
