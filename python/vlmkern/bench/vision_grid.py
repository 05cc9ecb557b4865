"""Qwen ViT index-tensor bench: vlmkern.ops.vision_grid (ATen ops on the device, no host sync)
vs transformers' vision_utils helpers (Python loops over ``grid_thw.tolist()``), for what one
vision forward needs: the RoPE positions, per-frame ``cu_seqlens``, and Qwen2.5-VL's windows or
Qwen3-VL's position-table taps. HF's ``cu_seqlens`` are padded to vlmkern's fixed length (one
small extra kernel in its time) so both give the same tensors."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlmkern.bench.harness import Case, Config

NAME = "vision_grid"
BASELINE = "hf"
EXACT = True  # integer indices and exactly computed weights

MERGE, PATCH, WINDOW, TABLE_SIDE = 2, 14, 112, 48  # Qwen2.5-VL's window; Qwen3-VL's 48 x 48 table


def _vlmkern(grid: torch.Tensor, num_patches: int, model: str) -> tuple:
    from vlmkern.ops import vision_grid as vg

    out = (vg.vision_position_ids(grid, num_patches, MERGE),
           vg.vision_cu_seqlens(grid, num_patches))
    if model == "qwen2_5_vl":
        return out + vg.vision_window_index(grid, num_patches, MERGE, WINDOW, PATCH)
    return out + vg.vision_interp_taps(grid, num_patches, MERGE, TABLE_SIDE)


def _hf(grid: torch.Tensor, num_patches: int, model: str) -> tuple:
    from transformers import vision_utils as vu

    def pad(cu: torch.Tensor, length: int) -> torch.Tensor:
        return F.pad(cu, (0, length - cu.shape[0]), value=num_patches)

    out = (vu.get_vision_position_ids(grid, MERGE),
           pad(vu.get_vision_cu_seqlens(grid), num_patches + 1))
    if model == "qwen2_5_vl":
        index, cu = vu.get_vision_window_index(grid, MERGE, WINDOW, PATCH)  # index: on the CPU
        return out + (index.to(grid.device), pad(cu, num_patches // MERGE**2 + 1))
    return out + vu.get_vision_interpolation_indices_and_weights(
        grid, TABLE_SIDE, "bilinear", True, MERGE)


def _mixed(total: int, seed: int) -> list[list[int]]:
    """Images of 8..48 merged tokens a side until ``total`` patches."""
    rng, grids, n = random.Random(seed), [], 0
    while n < total:
        h, w = (MERGE * rng.randint(8, 48) for _ in range(2))
        grids.append([1, h, w])
        n += h * w
    return grids


def _case(label: str, grids: list[list[int]], model: str, cfg: Config) -> Case:
    n = sum(t * h * w for t, h, w in grids)

    def make() -> tuple:
        return (torch.tensor(grids, device=cfg.device),)

    m = n // MERGE**2
    written = 16 * n + 4 * (n + 1)  # positions, cu_seqlens
    written += 8 * m + 4 * (m + 1) if model == "qwen2_5_vl" else 48 * n  # windows or taps
    return Case(f"{label} N{n}", make, bytes_moved=written,
                kwargs={"num_patches": n, "model": model})


def cases(cfg: Config) -> list[Case]:
    """Qwen2.5-VL: one 1344² image, 8 × 448², a 16-frame 448² video, mixed sizes to 16k patches;
    Qwen3-VL (taps): 8 × 512²."""
    quick = [_case("qwen2_5_vl 1x1344^2", [[1, 96, 96]], "qwen2_5_vl", cfg),
             _case("qwen2_5_vl mixed", _mixed(16384, 0), "qwen2_5_vl", cfg)]
    if cfg.quick:
        return quick
    return quick + [
        _case("qwen2_5_vl 8x448^2", [[1, 32, 32]] * 8, "qwen2_5_vl", cfg),
        _case("qwen2_5_vl video 16f 448^2", [[8, 32, 32]], "qwen2_5_vl", cfg),
        _case("qwen3_vl 8x512^2", [[1, 32, 32]] * 8, "qwen3_vl", cfg),
    ]


def providers(cfg: Config) -> dict[str, Callable]:
    return {"vlmkern": _vlmkern, "hf": _hf}


def reference() -> Callable:
    return _hf  # transformers defines the values
