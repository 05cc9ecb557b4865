"""Index tensors of packed Qwen-family ViTs (Qwen2-VL / 2.5-VL / 3-VL, Qwen2.5-Omni) from
``grid_thw`` without a host sync: per-frame ``cu_seqlens``, the 2D RoPE positions in merge-block
order, Qwen2.5-VL's window permutation and window ``cu_seqlens``, and Qwen3-VL's bilinear taps
into its position table. Plain ATen ops (not custom ops) on ``grid_thw``'s device.

transformers computes them with per-image Python loops over ``grid_thw.tolist()``: a host sync,
unbacked symbols under ``torch.compile`` and no CUDA-graph capture. Here every output size
follows from the number of patches, which the caller has as a shape. The values equal
transformers' ``vision_utils`` helpers. The ``cu_seqlens`` tensors have a fixed length (one more
than the patches, or merged tokens, they split) and end in repeats of the total: empty trailing
segments, which ``vlmkern.ops.cross_attention`` skips. ``exact=True`` trims them (a host sync)."""

from __future__ import annotations

import torch


def _grid(grid_thw: torch.Tensor, num_patches: int) -> torch.Tensor:
    """grid_thw as int64; on the CPU (where it costs no sync) outside compile, checks it sums to
    ``num_patches``."""
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"grid_thw must be (images, 3), got {tuple(grid_thw.shape)}")
    grid = grid_thw.long()
    if grid.device.type == "cpu" and not torch.compiler.is_compiling():
        total = int(grid.prod(-1).sum())
        if total != num_patches:
            raise ValueError(f"grid_thw holds {total} patches, the input {num_patches}")
    return grid


def _segments(counts: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor, torch.Tensor]:
    """Slot k of ``length`` holds the k-th item of the packed images (``counts`` (I,) items per
    image: patches, merged tokens, frames, windows) or, past the last one, nothing: per slot
    its index k, its image, the item's index inside that image and whether the slot holds one.
    Four (length,)."""
    ends = counts.cumsum(0)  # (I,)
    slot = torch.arange(length, device=counts.device)  # (length,)
    image = torch.searchsorted(ends, slot, right=True)
    used = image < counts.shape[0]
    image = image.clamp_max(counts.shape[0] - 1)
    return slot, image, slot - (ends - counts)[image], used


def _boundaries(starts: torch.Tensor, used: torch.Tensor, total: int, counts: torch.Tensor,
                exact: bool) -> torch.Tensor:
    """int32 segment starts, ``total`` in the unused slots (with ``exact``: cut after one)."""
    cu = torch.where(used, starts, total).to(torch.int32)
    return cu[: int(counts.sum()) + 1] if exact else cu


def vision_cu_seqlens(grid_thw: torch.Tensor, num_patches: int, *, exact: bool = False
                      ) -> torch.Tensor:
    """Per-frame segment boundaries of the packed patches (HF's ``get_vision_cu_seqlens``):
    ``[0, h0·w0, 2·h0·w0, ...]`` int32, length ``num_patches + 1`` (or exact)."""
    grid = _grid(grid_thw, num_patches)
    frame = grid[:, 1] * grid[:, 2]  # (I,) patches per frame
    first = (grid[:, 0] * frame).cumsum(0) - grid[:, 0] * frame  # (I,) the image's first patch
    _, image, j, used = _segments(grid[:, 0], num_patches + 1)  # a slot per frame
    return _boundaries(first[image] + j * frame[image], used, num_patches, grid[:, 0], exact)


def _rows_cols(grid: torch.Tensor, num_patches: int, merge: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each patch's (row, col) in its frame, the patches running block by block over merge×merge
    blocks (Qwen's order), and its image's (h, w). Four (N,) int64."""
    _, image, local, _ = _segments(grid.prod(-1), num_patches)  # a slot per patch
    h, w = grid[image, 1], grid[image, 2]  # (N,)
    within = local % (h * w)
    block, inner = within // (merge * merge), within % (merge * merge)
    blocks_per_row = w // merge
    row = block // blocks_per_row * merge + inner // merge
    col = block % blocks_per_row * merge + inner % merge
    return row, col, h, w


def vision_position_ids(grid_thw: torch.Tensor, num_patches: int,
                        spatial_merge_size: int = 2) -> torch.Tensor:
    """(N, 2) int64 (row, col) of each patch for the ViT's 2D RoPE (HF's
    ``get_vision_position_ids``)."""
    row, col, _, _ = _rows_cols(_grid(grid_thw, num_patches), num_patches, spatial_merge_size)
    return torch.stack([row, col], -1)


def _window_order(grid: torch.Tensor, tokens: int, merge: int, side: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each merged token's index and its position in window order: frames before it, the full
    window rows above, the windows to its left, then row-major inside its window. Two (M,)."""
    item, image, local, _ = _segments(grid.prod(-1) // (merge * merge), tokens)
    rows, cols = grid[image, 1] // merge, grid[image, 2] // merge  # (M,) the frame's merged grid
    frame = rows * cols
    t, rem = local // frame, local % frame
    r, c = rem // cols, rem % cols
    wr, wc = r // side, c // side  # the token's window
    win_rows = (rows - wr * side).clamp(max=side)
    win_cols = (cols - wc * side).clamp(max=side)
    return item, (item - local + t * frame + wr * side * cols + wc * side * win_rows
                  + (r - wr * side) * win_cols + (c - wc * side))


def _window_starts(grid: torch.Tensor, slots: int, merge: int, side: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k-th window's first merged token (slot k), whether slot k holds a window, and the
    windows per image: (slots,), (slots,), (I,)."""
    rows_i, cols_i = grid[:, 1] // merge, grid[:, 2] // merge  # (I,)
    tiles_c = (cols_i + side - 1) // side
    per_frame = (rows_i + side - 1) // side * tiles_c  # (I,) windows per frame
    counts = grid[:, 0] * per_frame
    _, image, j, used = _segments(counts, slots)
    rows, cols = rows_i[image], cols_i[image]  # (slots,)
    f, q = j // per_frame[image], j % per_frame[image]
    wr, wc = q // tiles_c[image], q % tiles_c[image]
    first = (grid[:, 0] * rows_i * cols_i).cumsum(0) - grid[:, 0] * rows_i * cols_i  # (I,)
    start = (first[image] + f * rows * cols + wr * side * cols
             + wc * side * (rows - wr * side).clamp(max=side))
    return start, used, counts


def vision_window_index(grid_thw: torch.Tensor, num_patches: int, spatial_merge_size: int,
                        window_size: int, patch_size: int, *, exact: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's windows (HF's ``get_vision_window_index``): ``window_index`` (N / m²,) int64,
    the merged tokens reordered window by window (windows of ``window_size // m // patch_size``
    merged tokens a side, row-major per frame, smaller at the right and bottom edges), and
    ``cu_window_seqlens`` int32 in patches, length ``N / m² + 1`` (or exact)."""
    grid = _grid(grid_thw, num_patches)
    m = spatial_merge_size
    side = window_size // m // patch_size
    if side < 1:
        raise ValueError(f"window_size {window_size} is under one merged token "
                         f"({m} x {patch_size} pixels)")
    item, dest = _window_order(grid, num_patches // (m * m), m, side)  # dest: a permutation
    window_index = torch.empty_like(dest)
    window_index[dest] = item
    start, used, counts = _window_starts(grid, item.shape[0] + 1, m, side)
    return window_index, _boundaries(start * (m * m), used, num_patches, counts, exact)


def vision_interp_taps(grid_thw: torch.Tensor, num_patches: int, spatial_merge_size: int,
                       num_grid_per_side: int, align_corners: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL's learned (side, side) position table resampled bilinearly to each frame (HF's
    ``get_vision_interpolation_indices_and_weights``, mode bilinear): per patch, in merge-block
    order, 4 flat table indices (N, 4) int64 and weights (N, 4) fp32, taps ordered (top-left,
    top-right, bottom-left, bottom-right)."""
    row, col, h, w = _rows_cols(_grid(grid_thw, num_patches), num_patches, spatial_merge_size)
    side = num_grid_per_side
    offsets = torch.arange(2, device=row.device)  # (2,) the lower and upper tap

    def axis(index: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if align_corners:
            src = index.float() * (side - 1) / (size - 1).clamp(min=1)
        else:
            src = (index.float() + 0.5) * side / size - 0.5
        low = src.floor()  # (N,)
        taps = (low.long()[:, None] + offsets).clamp(0, side - 1)  # (N, 2)
        weights = (1 - (src[:, None] - low[:, None] - offsets).abs()).clamp(min=0)
        return taps, weights

    (ht, hw_), (wt, ww) = axis(row, h), axis(col, w)
    indices = (ht[:, :, None] * side + wt[:, None, :]).flatten(1)
    weights = (hw_[:, :, None] * ww[:, None, :]).flatten(1)
    return indices, weights
