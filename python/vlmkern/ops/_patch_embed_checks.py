"""Argument checks of the patch_embed fake (meta) kernels, worded exactly as
csrc/common/patch_embed*.cpp words them (so meta, fake and real tensors raise the same errors)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._checks import check_rank

OP = "patch_embed"
_WEIGHT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _fail(cond: bool, msg: str) -> None:
    torch._check(cond, lambda: f"vlmkern.{OP}: {msg}")


def check_dtype_device(pixels: torch.Tensor, name: str, weight: torch.Tensor) -> None:
    _fail(weight.dtype in _WEIGHT_DTYPES,
          f"weight must be float32, float64, float16 or bfloat16, got {weight.dtype}")
    _fail(pixels.dtype in (torch.uint8, weight.dtype),
          f"{name} must be uint8 or weight's dtype {weight.dtype}, got {pixels.dtype}")
    _fail(weight.device == pixels.device,
          f"weight is on {weight.device} but {name} is on {pixels.device}")


def check_param(t: torch.Tensor | None, name: str, rank: int, layout: str,
                weight: torch.Tensor) -> None:
    if t is None:
        return
    check_rank(t, rank, OP, name, layout)
    _fail(t.device == weight.device, f"{name} is on {t.device} but weight is on {weight.device}")
    _fail(t.dtype == weight.dtype,
          f"{name} dtype {t.dtype} does not match weight dtype {weight.dtype}")
    _fail(t.shape[-1] == weight.shape[0],
          f"{name} has width {t.shape[-1]} but weight has D={weight.shape[0]} outputs")


def check_norm(mean: Sequence[float] | None, std: Sequence[float] | None, rescale: float,
               channels: int) -> None:
    if mean is not None:
        _fail(len(mean) == channels,
              f"mean has {len(mean)} values but there are C={channels} channels")
        for c, v in enumerate(mean):
            _fail(math.isfinite(v), f"mean must be finite, got {v} at channel {c}")
    if std is not None:
        _fail(len(std) == channels,
              f"std has {len(std)} values but there are C={channels} channels")
        for c, v in enumerate(std):
            _fail(v != 0 and math.isfinite(v),
                  f"std must be finite and nonzero, got {v} at channel {c}")
    _fail(math.isfinite(rescale) and rescale != 0,
          f"rescale must be finite and nonzero, got {rescale}")


def square_side(rows: int, what: str) -> int:
    side = math.isqrt(max(rows, 0))
    _fail(rows >= 1 and side * side == rows, what)
    return side


def check_image(pixels, weight, bias, pos_embed, has_cls, mean, std, rescale, channels_last,
                pos_interp) -> tuple[int, int]:
    """Returns the patch grid (gh, gw). Whether the table gets resized is not computed here: a
    comparison of the grid with S would add a guard (a recompilation) under torch.compile."""
    check_rank(pixels, 4, OP, "pixels", "(B, H, W, C)" if channels_last else "(B, C, H, W)")
    check_rank(weight, 4, OP, "weight", "(D, C, P, P)")
    check_dtype_device(pixels, "pixels", weight)
    _fail(pos_interp in ("bicubic", "none"),
          f"pos_interp must be 'bicubic' or 'none', got '{pos_interp}'")
    if channels_last:
        _, h, w, c = pixels.shape
    else:
        _, c, h, w = pixels.shape
    d, _, p, _ = weight.shape
    _fail(p >= 1 and weight.shape[3] == p,
          f"weight must have a square patch (D, C, P, P) with P >= 1, got shape "
          f"{list(weight.shape)}")
    _fail(weight.shape[1] == c and c >= 1,
          f"pixels has C={c} channels but weight expects C={weight.shape[1]}")
    _fail(h % p == 0, f"pixels height H={h} is not divisible by the patch size P={p}")
    _fail(w % p == 0, f"pixels width W={w} is not divisible by the patch size P={p}")
    gh, gw = h // p, w // p
    check_param(bias, "bias", 1, "(D,)", weight)
    check_param(pos_embed, "pos_embed", 2, "(L, D)", weight)
    check_norm(mean, std, rescale, c)
    if pos_embed is not None:
        rows = pos_embed.shape[0] - (1 if has_cls else 0)
        plus = " + 1 (CLS)" if has_cls else ""
        if pos_interp == "none":
            _fail(rows == gh * gw, f"pos_embed has {pos_embed.shape[0]} rows but the ({gh}, {gw})"
                  f" grid needs {gh * gw}{plus} (pos_interp='none')")
        else:
            _fail(rows >= 1, f"pos_embed has {pos_embed.shape[0]} rows: it needs at least 1 "
                  f"patch position{plus}")
            square_side(rows, f"pos_embed has {pos_embed.shape[0]} rows: not a square S*S "
                        f"table{plus}")
    return gh, gw


def check_packed(patches, weight, bias, grid_thw, pos_embed, merge, mean, std,
                 rescale) -> int:
    """Returns the table side S (0 without pos_embed)."""
    check_rank(patches, 2, OP, "patches", "(N, C*T*P*P)")
    check_rank(weight, 5, OP, "weight", "(D, C, T, P, P)")
    check_dtype_device(patches, "patches", weight)
    _, c, t, p, p2 = weight.shape
    _fail(p >= 1 and t >= 1 and c >= 1 and p2 == p,
          f"weight must be (D, C, T, P, P) with C, T, P >= 1, got shape {list(weight.shape)}")
    k = c * t * p * p
    _fail(patches.shape[1] == k,
          f"patches has {patches.shape[1]} values per row but weight needs C*T*P*P={k}")
    check_rank(grid_thw, 2, OP, "grid_thw", "(n, 3)")
    _fail(grid_thw.shape[1] == 3,
          f"grid_thw must have 3 columns (t, h, w), got shape {list(grid_thw.shape)}")
    _fail(grid_thw.dtype in (torch.int32, torch.int64),
          f"grid_thw must be int32 or int64, got {grid_thw.dtype}")
    _fail(grid_thw.device == patches.device,
          f"grid_thw is on {grid_thw.device} but patches is on {patches.device}")
    n = patches.shape[0]
    _fail(n == 0 or grid_thw.shape[0] >= 1, f"grid_thw has no rows but patches has N={n}")
    _fail(merge >= 1, f"spatial_merge_size must be >= 1, got {merge}")
    check_param(bias, "bias", 1, "(D,)", weight)
    check_param(pos_embed, "pos_embed", 2, "(S*S, D)", weight)
    check_norm(mean, std, rescale, c)
    if pos_embed is None:
        return 0
    rows = pos_embed.shape[0]
    return square_side(rows, f"pos_embed has {rows} rows: not a square S*S table")


def check_grad(grad: torch.Tensor, shape: Sequence[int], weight: torch.Tensor,
               layout: str) -> None:
    check_rank(grad, len(shape), OP, "grad", layout)
    _fail(list(grad.shape) == list(shape),
          f"grad must have shape {list(shape)}, got {list(grad.shape)}")
    _fail(grad.dtype == weight.dtype and grad.device == weight.device,
          f"grad must be {weight.dtype} on {weight.device}")
