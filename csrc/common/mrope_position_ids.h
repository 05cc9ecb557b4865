// mrope_position_ids: argument checks and kernel arguments shared by the CPU and CUDA
// implementations, so both reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

#include "common/mrope_position_ids_core.h"

namespace vlmkern {

// The op's inputs after the shape / dtype / device checks (data is not looked at).
struct MropeInputs {
  at::Tensor tokens;                       // (B, S) int32 / int64
  std::optional<at::Tensor> mask;          // (B, S) integer or bool
  std::optional<at::Tensor> grids[2];      // image (Ni, 3), video (Nv, 3): int32 / int64
  std::optional<at::Tensor> intervals;     // (Nv,) float32 / float64
  int64_t merge, image_token, video_token;
  bool split_frames, max_plus_one;
};

// Checks every argument (shapes, dtypes, devices, flags) and bundles them.
MropeInputs mrope_check(const at::Tensor& tokens, const std::optional<at::Tensor>& attention_mask,
                        const std::optional<at::Tensor>& image_grid_thw,
                        const std::optional<at::Tensor>& video_grid_thw,
                        const std::optional<at::Tensor>& video_intervals,
                        int64_t spatial_merge_size, int64_t image_token, int64_t video_token,
                        bool split_video_frames, std::string_view text_after_video);

// Inclusive cumsum of the video grids' t column (int64, on the grids' device): where each video's
// frames end when videos are split into frames. Undefined unless split_frames and videos given.
at::Tensor mrope_frame_ends(const MropeInputs& in);

// Kernel arguments for outputs pos (3, B, S) and deltas (B, 1), both contiguous int64.
mrope::Args mrope_make_args(const MropeInputs& in, const at::Tensor& frame_ends, at::Tensor& pos,
                            at::Tensor& deltas);

}  // namespace vlmkern
