"""Reference pixel shuffle / unshuffle: the closed form of SEMANTICS.md in view/permute/reshape."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pixel_shuffle(x: torch.Tensor, scale: int, grid: Sequence[int] | None = None) -> torch.Tensor:
    """``(B, H, W, C)`` → ``(B, H/r, W/r, r²C)``.

    With ``grid=(H, W)``: ``(B, N, C)`` → ``(B, N/r², r²C)``.
    """
    r = scale
    if grid is not None:
        b, _, c = x.shape
        h, w = grid
    else:
        b, h, w, c = x.shape
    out = x.reshape(b, h // r, r, w // r, r, c).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(b, h // r, w // r, r * r * c)
    return out.reshape(b, (h // r) * (w // r), r * r * c) if grid is not None else out


def pixel_unshuffle(y: torch.Tensor, scale: int, grid: Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of :func:`pixel_shuffle`: ``(B, h, w, r²C)`` → ``(B, h·r, w·r, C)``."""
    r = scale
    if grid is not None:
        b, _, rrc = y.shape
        h, w = grid[0] // r, grid[1] // r
    else:
        b, h, w, rrc = y.shape
    c = rrc // (r * r)
    out = y.reshape(b, h, w, r, r, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * r, w * r, c)
    return out.reshape(b, h * r * w * r, c) if grid is not None else out
