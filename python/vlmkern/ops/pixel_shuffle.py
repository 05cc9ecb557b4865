"""Pixel shuffle (space-to-depth token compression, InternVL / Idefics3 / SmolVLM / Llama-4 order)
and its inverse: public wrappers, fake kernels and autograd for ``torch.ops.vlmkern``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import check_rank

_ELEMENT_SIZES = (1, 2, 4, 8, 16)
_MAX_SCALE = 1 << 20  # kMaxScale in csrc/common/pixel_shuffle.h
_INT64_MAX = (1 << 63) - 1


def pixel_shuffle(
    x: torch.Tensor, scale: int, grid: Sequence[int] | None = None
) -> torch.Tensor:
    """Merge each ``scale × scale`` block of patch tokens into one token (space-to-depth).

    ``Out[b, i, j, (dy·r + dx)·C + c] = X[b, r·i + dy, r·j + dx, c]`` with ``r = scale``, the
    channel order of InternVL's ``pixel_shuffle(x, 0.5)`` and Idefics3's connector (not
    ``F.pixel_unshuffle``, which orders channels ``(c, dy, dx)``).

    Args:
        x: ``(B, H, W, C)`` patch grid, or ``(B, N, C)`` tokens in row-major grid order with
            ``grid=(H, W)`` and ``N == H·W``. Any strides (e.g. ``feats[:, 1:]`` after dropping
            CLS) are read in place, without a copy. Any dtype (fp32/fp16/bf16, integers, bool).
        scale: ``r ≥ 1``, dividing ``H`` and ``W`` (non-square grids are fine).
        grid: ``(H, W)`` when ``x`` is 3-D.

    Returns:
        A new contiguous tensor ``(B, H/r, W/r, r²·C)``, or ``(B, N/r², r²·C)`` for 3-D input,
        same dtype and device as ``x``. Differentiable (the backward is :func:`pixel_unshuffle`).
    """
    _check_scale(scale, "pixel_shuffle")
    if grid is None:
        if x.dim() == 3:
            raise ValueError(
                "vlmkern.pixel_shuffle: x is 3-D (B, N, C); pass grid=(H, W) with N == H*W"
            )
        return torch.ops.vlmkern.pixel_shuffle(x, scale)
    height, width = _check_grid(x, grid, "pixel_shuffle", "x")
    batch, _, channels = x.shape
    out = torch.ops.vlmkern.pixel_shuffle(x.view(batch, height, width, channels), scale)
    return out.flatten(1, 2)  # (B, h·w, r²C); flatten, not view(B, -1, ·): B may be 0


def pixel_unshuffle(
    y: torch.Tensor, scale: int, grid: Sequence[int] | None = None
) -> torch.Tensor:
    """Inverse of :func:`pixel_shuffle` (depth-to-space).

    Args:
        y: ``(B, h, w, r²·C)``, or ``(B, n, r²·C)`` with ``grid=(H, W)`` the *unshuffled* grid
            (``n == (H/r)·(W/r)``). Any strides and dtype.
        scale: ``r ≥ 1``; ``r²`` must divide the channel count.
        grid: ``(H, W)`` of the output when ``y`` is 3-D.

    Returns:
        A new contiguous ``(B, h·r, w·r, C)``, or ``(B, H·W, C)`` for 3-D input.
    """
    _check_scale(scale, "pixel_unshuffle")
    if grid is None:
        if y.dim() == 3:
            raise ValueError(
                "vlmkern.pixel_unshuffle: y is 3-D (B, n, r*r*C); pass grid=(H, W), the "
                "unshuffled grid"
            )
        return torch.ops.vlmkern.pixel_unshuffle(y, scale)
    height, width = _check_grid(y, grid, "pixel_unshuffle", "y", scale)
    batch, _, channels = y.shape
    coarse = y.view(batch, height // scale, width // scale, channels)
    out = torch.ops.vlmkern.pixel_unshuffle(coarse, scale)
    return out.view(batch, height * width, out.shape[-1])


def _check_scale(scale: int, op: str) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"vlmkern.{op}: scale must be an int >= 1, got {scale!r}")


def _check_grid(
    t: torch.Tensor, grid: Sequence[int], op: str, name: str, scale: int = 1
) -> tuple[int, int]:
    """Validates ``grid=(H, W)`` against a 3-D ``t`` whose token count is ``H·W / scale²``."""
    if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
        raise ValueError(f"vlmkern.{op}: grid must be two positive ints (H, W), got {grid!r}")
    if t.dim() != 3:
        raise ValueError(
            f"vlmkern.{op}: with grid={tuple(grid)}, {name} must be 3-D (B, N, C), got "
            f"{t.dim()}-D of shape {tuple(t.shape)}"
        )
    height, width = grid
    if scale > 1 and (height % scale or width % scale):
        raise ValueError(
            f"vlmkern.{op}: grid {tuple(grid)} is not divisible by scale={scale}"
        )
    expected = height * width // (scale * scale)
    if t.shape[1] != expected:
        raise ValueError(
            f"vlmkern.{op}: {name} has N={t.shape[1]} tokens but grid {tuple(grid)} needs "
            f"{expected}"
        )
    return height, width


# ---- fake (meta) kernels: the same checks and messages as csrc/common/pixel_shuffle.cpp --------


def _check_common(t: torch.Tensor, scale: int, op: str, name: str, layout: str) -> None:
    check_rank(t, 4, op, name, layout)
    torch._check(
        not t.is_quantized,
        lambda: f"vlmkern.{op}: {name} must not be quantized, got {t.dtype}",
    )
    torch._check(
        t.element_size() in _ELEMENT_SIZES,
        lambda: f"vlmkern.{op}: {name} has an unsupported dtype {t.dtype}",
    )
    torch._check(scale >= 1, lambda: f"vlmkern.{op}: scale must be >= 1, got {scale}")
    torch._check(
        scale <= _MAX_SCALE,
        lambda: f"vlmkern.{op}: scale must be <= {_MAX_SCALE}, got {scale}",
    )


@torch.library.register_fake("vlmkern::pixel_shuffle")
def _pixel_shuffle_fake(x: torch.Tensor, scale: int) -> torch.Tensor:
    _check_common(x, scale, "pixel_shuffle", "x", "(B, H, W, C)")
    b, h, w, c = x.shape
    torch._check(
        h % scale == 0,
        lambda: f"vlmkern.pixel_shuffle: x height H={h} is not divisible by scale={scale}",
    )
    torch._check(
        w % scale == 0,
        lambda: f"vlmkern.pixel_shuffle: x width W={w} is not divisible by scale={scale}",
    )
    torch._check(
        c * scale * scale <= _INT64_MAX,
        lambda: f"vlmkern.pixel_shuffle: x channels C={c} times scale*scale={scale * scale} "
        "overflows int64",
    )
    return x.new_empty((b, h // scale, w // scale, c * scale * scale))


@torch.library.register_fake("vlmkern::pixel_unshuffle")
def _pixel_unshuffle_fake(y: torch.Tensor, scale: int) -> torch.Tensor:
    _check_common(y, scale, "pixel_unshuffle", "y", "(B, h, w, r*r*C)")
    b, h, w, c = y.shape
    torch._check(
        c % (scale * scale) == 0,
        lambda: f"vlmkern.pixel_unshuffle: y channels={c} is not divisible by "
        f"scale*scale={scale * scale}",
    )
    torch._check(
        h * scale <= _INT64_MAX and w * scale <= _INT64_MAX,
        lambda: f"vlmkern.pixel_unshuffle: y grid ({h}, {w}) times scale={scale} overflows int64",
    )
    return y.new_empty((b, h * scale, w * scale, c // (scale * scale)))


# ---- autograd: each op's backward is the other op ----------------------------------------------


def _save_scale(ctx, inputs, output) -> None:
    ctx.scale = inputs[1]


def _pixel_shuffle_backward(ctx, grad: torch.Tensor):
    return torch.ops.vlmkern.pixel_unshuffle(grad, ctx.scale), None


def _pixel_unshuffle_backward(ctx, grad: torch.Tensor):
    return torch.ops.vlmkern.pixel_shuffle(grad, ctx.scale), None


torch.library.register_autograd(
    "vlmkern::pixel_shuffle", _pixel_shuffle_backward, setup_context=_save_scale
)
torch.library.register_autograd(
    "vlmkern::pixel_unshuffle", _pixel_unshuffle_backward, setup_context=_save_scale
)
