// CPU implementation of mrope_position_ids: the chunked passes of common/mrope_position_ids_core.h
// run sequentially per row (rows in parallel), then any inconsistency is raised by name.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/mrope_position_ids.h"
#include "ops.h"

namespace vlmkern {
namespace {

using namespace mrope;  // NOLINT(build/namespaces)

constexpr const char* kOp = "mrope_position_ids";
// Chunks per row: more than one so the CPU runs the prefix composition the CUDA kernel relies on.
constexpr int64_t kChunks = 16;

constexpr int64_t kTokensPerTask = int64_t{1} << 20;

int64_t chunk_len(int64_t seq) { return (seq + kChunks - 1) / kChunks; }

// Exclusive prefixes of passes A and B at every chunk of a row, [kChunks] = row totals: what the
// CUDA kernel gets from its first two CTA-wide scans.
struct RowPrefix {
  ScanA a[kChunks + 1];
  ScanB b[kChunks + 1];
};

template <typename K>
void scan_ab(const Args& a, const K& kind, int64_t b, RowPrefix* out) {
  const int64_t len = chunk_len(a.seq);
  out->a[0] = identity_a();
  out->b[0] = identity_b();
  for (int64_t i = 0; i < kChunks; ++i) {
    const int64_t lo = std::min(a.seq, i * len), hi = std::min(a.seq, lo + len);
    out->a[i + 1] = combine(out->a[i], pass_a(kind, b, lo, hi));
    out->b[i + 1] = combine(out->b[i], pass_b(kind, b, lo, hi, out->a[i]));
  }
}

// Passes C and D of row b, given its prefixes and the blocks of earlier rows (offset).
template <typename K>
RowError write_row(const Args& a, const K& kind, int64_t b, const RowPrefix& pre,
                   const int64_t offset[2]) {
  RowError err{kOk, 0, 0, 0, 0, 0};
  const int64_t len = chunk_len(a.seq);
  ChunkIn in{identity_a(), identity_b(), {offset[0], offset[1]}, 0};
  int64_t best = kInt64Min;
  for (int64_t i = 0; i < kChunks; ++i) {
    const int64_t lo = std::min(a.seq, i * len), hi = std::min(a.seq, lo + len);
    in.a = pre.a[i];
    in.b = pre.b[i];
    const ScanC cc = pass_c(a, kind, b, lo, hi, in);
    best = std::max(best, pass_d(a, kind, b, lo, hi, in, &err));
    in.p += cc.advance;
  }
  finish_row(a, b, pre.a[kChunks], pre.b[kChunks], offset, best, &err);
  return err;
}

// All rows: prefixes (rows in parallel), grid offsets across rows, then positions.
template <typename K>
std::vector<RowError> run_rows(const Args& a, const K& kind, int64_t grain) {
  const int64_t batch = a.batch;
  std::vector<RowPrefix> prefix(batch);
  at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) scan_ab(a, kind, b, &prefix[b]);
  });
  std::vector<int64_t> offsets(2 * batch);  // (B, 2): blocks of each modality in earlier rows
  int64_t run[2] = {0, 0};
  for (int64_t b = 0; b < batch; ++b) {
    for (int m = 0; m < 2; ++m) {
      offsets[2 * b + m] = run[m];
      run[m] += prefix[b].b[kChunks].starts[m];
    }
  }
  std::vector<RowError> errors(batch);
  at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      errors[b] = write_row(a, kind, b, prefix[b], &offsets[2 * b]);
    }
  });
  return errors;
}

const char* grid_name(int64_t kind) { return kind == kImage ? "image_grid_thw" : "video_grid_thw"; }
const char* kind_name(int64_t kind) { return kind == kImage ? "image" : "video"; }

// Data checks the CUDA path cannot make without a host sync: grid entries >= 0, finite intervals.
void check_values(const Args& a) {
  for (int m = 0; m < 2; ++m) {
    for (int64_t r = 0; r < a.grid_rows[m]; ++r) {
      int64_t v[3];
      for (int k = 0; k < 3; ++k) {
        v[k] = load_int(a.grids[m], r * a.grid_s0[m] + k * a.grid_s1[m], a.grid_bytes[m]);
      }
      VLMKERN_CHECK(v[0] >= 0 && v[1] >= 0 && v[2] >= 0, kOp, grid_name(m + 1), "[", r, "] = (",
                    v[0], ", ", v[1], ", ", v[2], ") has a negative entry");
    }
  }
  if (a.interval == nullptr) return;
  for (int64_t r = 0; r < a.grid_rows[1]; ++r) {
    const double x = a.interval_kind == kIntervalF32
                         ? static_cast<const float*>(a.interval)[r * a.interval_stride]
                         : static_cast<const double*>(a.interval)[r * a.interval_stride];
    VLMKERN_CHECK(std::isfinite(x), kOp, "video_intervals[", r, "] = ", x, " is not finite");
  }
}

[[noreturn]] void raise(const Args& a, int64_t b, const RowError& e) {
  const char* grid = grid_name(e.kind);
  const char* kind = kind_name(e.kind);
  const bool frames = e.kind == kVideo && a.split_frames;
  if (e.code == kNoGrid) {
    VLMKERN_CHECK(a.grids[e.kind - 1] != nullptr, kOp, "row ", b, " has ", kind, " tokens but ",
                  grid, " is None");
    if (frames) {
      const int64_t n = a.grid_rows[1];
      VLMKERN_CHECK(false, kOp, grid, " holds ", a.frame_ends[n - 1],
                    " frames in total (split_video_frames: one block per frame) but row ", b,
                    " holds video block #", e.idx, " (blocks are counted across rows in order)");
    }
    VLMKERN_CHECK(false, kOp, grid, " has ", a.grid_rows[e.kind - 1], " rows but row ", b,
                  " holds ", kind, " block #", e.idx, " (a block is a run of ", kind,
                  " tokens; blocks are counted across rows in order)");
  }
  const int m = static_cast<int>(e.kind - 1);
  int64_t v[3];
  for (int k = 0; k < 3; ++k) {
    v[k] = load_int(a.grids[m], e.grid_row * a.grid_s0[m] + k * a.grid_s1[m], a.grid_bytes[m]);
  }
  VLMKERN_CHECK(e.code != kBadGrid, kOp, grid, "[", e.grid_row, "] = (", v[0], ", ", v[1], ", ",
                v[2], "): its token count overflows int64");
  if (frames) {
    VLMKERN_CHECK(false, kOp, "row ", b, ": video block #", e.idx, " (a frame of ", grid, "[",
                  e.grid_row, "] = (", v[0], ", ", v[1], ", ", v[2], ")) has ", e.actual,
                  " tokens but a frame needs (h/m)*(w/m) = ", e.expected,
                  " with spatial_merge_size m=", a.merge);
  }
  VLMKERN_CHECK(false, kOp, "row ", b, ": ", kind, " block #", e.idx, " has ", e.actual,
                " tokens but ", grid, "[", e.grid_row, "] = (", v[0], ", ", v[1], ", ", v[2],
                ") needs t*(h/m)*(w/m) = ", e.expected, " with spatial_merge_size m=", a.merge);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mrope_position_ids_cpu(
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
  const int64_t batch = tokens.size(0), seq = tokens.size(1);
  const auto opts = tokens.options().dtype(at::kLong);
  at::Tensor pos = at::empty({3, batch, seq}, opts);
  at::Tensor deltas = at::empty({batch, 1}, opts);
  const at::Tensor frame_ends = mrope_frame_ends(in);
  const Args a = mrope_make_args(in, frame_ends, pos, deltas);
  check_values(a);
  if (batch == 0) return {pos, deltas};
  // Rows per task: threads only pay off past ~1M tokens (a parallel region costs more than a
  // small batch, and stalls badly when another process holds a core).
  const int64_t grain = std::max<int64_t>(1, kTokensPerTask / std::max<int64_t>(seq, 1));
  const std::vector<RowError> errors =
      with_kinds(a, [&](const auto& kind) { return run_rows(a, kind, grain); });
  for (int64_t b = 0; b < batch; ++b) {
    if (errors[b].code != kOk) raise(a, b, errors[b]);
  }
  return {pos, deltas};
}

TORCH_LIBRARY_IMPL(vlmkern, CPU, m) { m.impl("mrope_position_ids", &mrope_position_ids_cpu); }

}  // namespace vlmkern
