// Argument checks and kernel arguments for mrope_position_ids (shared by CPU and CUDA).
#include "common/mrope_position_ids.h"

#include <ATen/ops/cumsum.h>

#include "common/checks.h"

namespace vlmkern {
namespace {

constexpr const char* kOp = "mrope_position_ids";

bool is_int32_or_64(const at::Tensor& t) {
  return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
}

void check_device(const at::Tensor& t, const at::Tensor& tokens, const char* name) {
  VLMKERN_CHECK(t.device() == tokens.device(), kOp, name, " is on ", t.device(),
                " but tokens is on ", tokens.device());
}

void check_grid(const std::optional<at::Tensor>& grid, const at::Tensor& tokens, const char* name) {
  if (!grid.has_value()) return;
  const at::Tensor& g = *grid;
  VLMKERN_CHECK(g.dim() == 2 && g.size(1) == 3, kOp, name,
                " must be a 2-D tensor (N, 3) of (t, h, w) rows, got shape ", g.sizes());
  VLMKERN_CHECK(is_int32_or_64(g), kOp, name, " must be int64 or int32, got ", g.scalar_type());
  check_device(g, tokens, name);
}

}  // namespace

MropeInputs mrope_check(const at::Tensor& tokens, const std::optional<at::Tensor>& attention_mask,
                        const std::optional<at::Tensor>& image_grid_thw,
                        const std::optional<at::Tensor>& video_grid_thw,
                        const std::optional<at::Tensor>& video_intervals,
                        int64_t spatial_merge_size, int64_t image_token, int64_t video_token,
                        bool split_video_frames, std::string_view text_after_video) {
  check_rank(tokens, 2, kOp, "tokens", "(B, S) of mm_token_type_ids or input_ids");
  VLMKERN_CHECK(is_int32_or_64(tokens), kOp,
                "tokens (mm_token_type_ids or input_ids) must be int64 or int32, got ",
                tokens.scalar_type());
  if (attention_mask.has_value()) {
    const at::Tensor& m = *attention_mask;
    VLMKERN_CHECK(m.sizes() == tokens.sizes(), kOp, "attention_mask must have the shape of tokens ",
                  tokens.sizes(), ", got ", m.sizes());
    VLMKERN_CHECK(m.scalar_type() == at::kBool ||
                      (at::isIntegralType(m.scalar_type(), /*includeBool=*/false) &&
                       m.element_size() <= 8),
                  kOp, "attention_mask must be bool or an integer dtype, got ", m.scalar_type());
    check_device(m, tokens, "attention_mask");
  }
  check_grid(image_grid_thw, tokens, "image_grid_thw");
  check_grid(video_grid_thw, tokens, "video_grid_thw");
  if (video_intervals.has_value()) {
    const at::Tensor& iv = *video_intervals;
    VLMKERN_CHECK(video_grid_thw.has_value(), kOp,
                  "video_intervals is given but video_grid_thw is None");
    VLMKERN_CHECK(!split_video_frames, kOp, "video_intervals must be None with ",
                  "split_video_frames=True (every frame has t = 1)");
    VLMKERN_CHECK(iv.dim() == 1 && iv.size(0) == video_grid_thw->size(0), kOp,
                  "video_intervals must have shape (Nv,) = (", video_grid_thw->size(0),
                  ",), one per video_grid_thw row, got ", iv.sizes());
    VLMKERN_CHECK(iv.scalar_type() == at::kFloat || iv.scalar_type() == at::kDouble, kOp,
                  "video_intervals must be float32 or float64, got ", iv.scalar_type());
    check_device(iv, tokens, "video_intervals");
  }
  VLMKERN_CHECK(spatial_merge_size >= 1, kOp, "spatial_merge_size must be >= 1, got ",
                spatial_merge_size);
  VLMKERN_CHECK(image_token != video_token, kOp, "image_token and video_token must differ, got ",
                image_token, " for both");
  const bool hf = text_after_video == "hf";
  VLMKERN_CHECK(hf || text_after_video == "max_plus_one", kOp,
                "text_after_video must be \"hf\" or \"max_plus_one\", got \"", text_after_video,
                "\"");
  MropeInputs in;
  in.tokens = tokens;
  in.mask = attention_mask;
  in.grids[0] = image_grid_thw;
  in.grids[1] = video_grid_thw;
  in.intervals = video_intervals;
  in.merge = spatial_merge_size;
  in.image_token = image_token;
  in.video_token = video_token;
  in.split_frames = split_video_frames;
  in.max_plus_one = !hf;
  return in;
}

at::Tensor mrope_frame_ends(const MropeInputs& in) {
  if (!in.split_frames || !in.grids[1].has_value() || in.grids[1]->size(0) == 0) return {};
  return at::cumsum(in.grids[1]->select(1, 0), 0, at::kLong);
}

mrope::Args mrope_make_args(const MropeInputs& in, const at::Tensor& frame_ends, at::Tensor& pos,
                            at::Tensor& deltas) {
  mrope::Args a{};
  a.tokens = in.tokens.const_data_ptr();
  a.tokens_bytes = static_cast<int>(in.tokens.element_size());
  a.tokens_sb = in.tokens.stride(0);
  a.tokens_ss = in.tokens.stride(1);
  a.mask = nullptr;
  a.mask_bytes = 1;
  if (in.mask.has_value()) {
    a.mask = in.mask->const_data_ptr();
    a.mask_bytes = static_cast<int>(in.mask->element_size());
    a.mask_sb = in.mask->stride(0);
    a.mask_ss = in.mask->stride(1);
  }
  a.batch = in.tokens.size(0);
  a.seq = in.tokens.size(1);
  a.image_token = in.image_token;
  a.video_token = in.video_token;
  for (int m = 0; m < 2; ++m) {
    a.grids[m] = nullptr;
    a.grid_bytes[m] = 8;
    a.grid_rows[m] = 0;
    a.grid_s0[m] = a.grid_s1[m] = 0;
    if (in.grids[m].has_value()) {
      const at::Tensor& g = *in.grids[m];
      a.grids[m] = g.const_data_ptr();
      a.grid_bytes[m] = static_cast<int>(g.element_size());
      a.grid_rows[m] = g.size(0);
      a.grid_s0[m] = g.stride(0);
      a.grid_s1[m] = g.stride(1);
    }
  }
  a.interval = nullptr;
  a.interval_kind = mrope::kIntervalNone;
  a.interval_stride = 0;
  if (in.intervals.has_value()) {
    a.interval = in.intervals->const_data_ptr();
    a.interval_kind = in.intervals->scalar_type() == at::kFloat ? mrope::kIntervalF32
                                                                : mrope::kIntervalF64;
    a.interval_stride = in.intervals->stride(0);
  }
  a.frame_ends = frame_ends.defined() ? frame_ends.const_data_ptr<int64_t>() : nullptr;
  a.merge = in.merge;
  a.split_frames = in.split_frames;
  a.max_plus_one = in.max_plus_one;
  a.pos = pos.mutable_data_ptr<int64_t>();
  a.deltas = deltas.mutable_data_ptr<int64_t>();
  return a;
}

}  // namespace vlmkern
