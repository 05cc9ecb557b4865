"""``vlmkern.nn.PixelShuffle``: the InternVL / Idefics3 token-compression step as a module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..ops import pixel_shuffle


class PixelShuffle(nn.Module):
    """Space-to-depth over a patch grid; no parameters.

    ``forward(x)``: ``(B, H, W, C)`` → ``(B, H/r, W/r, r²C)``, or ``(B, N, C)`` → ``(B, N/r², r²C)``
    when the module was built with ``grid=(H, W)``. See :func:`vlmkern.ops.pixel_shuffle`.
    """

    def __init__(self, scale: int, grid: Sequence[int] | None = None) -> None:
        super().__init__()
        self.scale = int(scale)
        self.grid = tuple(grid) if grid is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle(x, self.scale, self.grid)

    def extra_repr(self) -> str:
        return f"scale={self.scale}" + (f", grid={self.grid}" if self.grid else "")
