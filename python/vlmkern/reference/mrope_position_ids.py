"""Reference M-RoPE position ids: a per-row Python loop over token groups, as HF's get_rope_index
(transformers 5.x) does, with the "max_plus_one" rule and every input form of the vlmkern op."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def mrope_position_ids(
    input_ids: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    model: str = "qwen2_vl",
    spatial_merge_size: int = 2,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    tokens_per_second: int | float = 2,
    text_after_video: str = "hf",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(position_ids (3, B, S) int64, rope_deltas (B, 1) int64)``; same arguments and meaning
    as :func:`vlmkern.ops.mrope_position_ids`. Raises ValueError on inconsistent inputs."""
    if mm_token_type_ids is not None:
        types = mm_token_type_ids.long()
        kinds = torch.where((types == 1) | (types == 2), types, 0)
    else:
        image_token = 151655 if image_token_id is None else image_token_id
        video_token = 151656 if video_token_id is None else video_token_id
        kinds = (input_ids == image_token).long() + 2 * (input_ids == video_token).long()
    device = kinds.device
    kinds = kinds.cpu()
    batch, seq = kinds.shape
    m = spatial_merge_size

    grids = {1: [], 2: []}
    if image_grid_thw is not None:
        grids[1] = [tuple(g) for g in image_grid_thw.tolist()]
    if video_grid_thw is not None:
        grids[2] = [tuple(g) for g in video_grid_thw.tolist()]
        if model == "qwen3_vl":  # one (1, h, w) block per frame
            grids[2] = [(1, h, w) for t, h, w in grids[2] for _ in range(t)]
    intervals = None
    if model == "qwen2_5_vl":
        if second_per_grid_ts is None:
            intervals = iter([tokens_per_second * 1] * len(grids[2]))
        else:
            if isinstance(second_per_grid_ts, torch.Tensor):
                second_per_grid_ts = second_per_grid_ts.cpu()
            intervals = iter([tokens_per_second * s for s in second_per_grid_ts])
    taken = {1: 0, 2: 0}

    position_ids = torch.zeros(3, batch, seq, dtype=torch.int64)
    rope_deltas = torch.zeros(batch, 1, dtype=torch.int64)
    for b in range(batch):
        keep = torch.ones(seq, dtype=torch.bool)
        if attention_mask is not None:
            keep = attention_mask[b].cpu().bool()
        row_kinds = kinds[b][keep].tolist()
        start = 0
        pieces = []
        for kind, group in itertools.groupby(row_kinds):
            n = len(list(group))
            if kind == 0:
                pieces.append(torch.arange(n).view(1, -1).expand(3, -1) + start)
                start += n
                continue
            name = "image" if kind == 1 else "video"
            if taken[kind] >= len(grids[kind]):
                raise ValueError(f"row {b}: {name} block #{taken[kind]} has no grid")
            t, h, w = grids[kind][taken[kind]]
            taken[kind] += 1
            h, w = h // m, w // m
            if n != t * h * w:
                raise ValueError(f"row {b}: {name} block of {n} tokens, grid needs {t * h * w}")
            t_index = torch.arange(t)
            if kind == 2 and intervals is not None:
                t_index = (t_index * next(intervals)).long()
            block = torch.stack(
                [
                    t_index.view(-1, 1, 1).expand(t, h, w),
                    torch.arange(h).view(1, -1, 1).expand(t, h, w),
                    torch.arange(w).view(1, 1, -1).expand(t, h, w),
                ]
            ).reshape(3, -1)
            block = block + start
            pieces.append(block)
            start = start + max(h, w) if text_after_video == "hf" else int(block.max()) + 1
        if pieces:
            row = torch.cat(pieces, dim=1)
            position_ids[:, b, keep] = row
            rope_deltas[b, 0] = int(row.max()) + 1 - len(row_kinds)
    return position_ids.to(device), rope_deltas.to(device)
