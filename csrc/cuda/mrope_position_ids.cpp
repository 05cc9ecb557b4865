// CUDA implementation of mrope_position_ids: shared checks, allocation, then the torch-free
// kernels on the current stream of the tokens' device. No host sync: CUDA-graph capturable.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common/mrope_position_ids.h"
#include "cuda/mrope_position_ids.h"
#include "ops.h"

namespace vlmkern {

std::tuple<at::Tensor, at::Tensor> mrope_position_ids_cuda(
    const at::Tensor& tokens, const std::optional<at::Tensor>& attention_mask,
    const std::optional<at::Tensor>& image_grid_thw,
    const std::optional<at::Tensor>& video_grid_thw,
    const std::optional<at::Tensor>& video_intervals, int64_t spatial_merge_size,
    int64_t image_token, int64_t video_token, bool split_video_frames,
    std::string_view text_after_video) {
  const MropeInputs in =
      mrope_check(tokens, attention_mask, image_grid_thw, video_grid_thw, video_intervals,
                  spatial_merge_size, image_token, video_token, split_video_frames,
                  text_after_video);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const int64_t batch = tokens.size(0), seq = tokens.size(1);
  const auto opts = tokens.options().dtype(at::kLong);
  at::Tensor pos = at::empty({3, batch, seq}, opts);
  at::Tensor deltas = at::empty({batch, 1}, opts);
  if (batch == 0) return {pos, deltas};
  const at::Tensor frame_ends = mrope_frame_ends(in);  // device cumsum, no sync
  at::Tensor counts = at::empty({batch, 2}, opts);
  const mrope::Args a = mrope_make_args(in, frame_ends, pos, deltas);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(tokens.device().index()).stream();
  C10_CUDA_CHECK(launch_mrope_position_ids(a, counts.mutable_data_ptr<int64_t>(), stream));
  return {pos, deltas};
}

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) { m.impl("mrope_position_ids", &mrope_position_ids_cuda); }

}  // namespace vlmkern
