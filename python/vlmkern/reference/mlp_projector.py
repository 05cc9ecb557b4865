"""Reference MLP projector (VLM connector): shuffle / merge → norm → Linear → activation → Linear,
written as HF writes each piece (float64-capable; no vlmkern imports)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def activation_fn(h: torch.Tensor, activation: str) -> torch.Tensor:
    """HF's ACT2FN["gelu"] (erf), ["gelu_pytorch_tanh"], ["quick_gelu"], or the identity."""
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "quick_gelu":
        return h * torch.sigmoid(1.702 * h)
    if activation == "none":
        return h
    raise ValueError(f"unknown activation {activation!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm: statistics in fp32 (fp64 for fp64 input), ``weight * x̂.to(dtype)``."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def mlp_projector(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    activation: str = "gelu",
    norm: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    norm_position: str = "pre",
    shuffle: int | None = None,
    merge: int | None = None,
    grid: Sequence[int] | None = None,
) -> torch.Tensor:
    """Same arguments and result as :func:`vlmkern.ops.mlp_projector`.

    shuffle=r: x ``(B, H, W, C)`` (or ``(B, N, C)`` with ``grid``) → InternVL/Idefics3 pixel
    shuffle → ``(B, H/r, W/r, r²C)``. merge=s: x ``(..., C)`` → ``x.view(-1, s²C)`` (Qwen). The norm
    runs on C before the shuffle / merge (``"pre"``) or on the merged features (``"post"``).
    """
    r = shuffle or 1
    s = merge or 1
    norm = norm or "none"

    def apply_norm(t: torch.Tensor) -> torch.Tensor:
        if norm == "layernorm":
            return F.layer_norm(t, t.shape[-1:], norm_weight, norm_bias, eps)
        if norm == "rmsnorm":
            return rms_norm(t, norm_weight, eps)
        return t

    lead: tuple[int, ...]
    if r > 1:
        if grid is not None:
            b, _, c = x.shape
            h, w = grid
        else:
            b, h, w, c = x.shape
        t = apply_norm(x) if norm_position == "pre" else x
        t = t.reshape(b, h // r, r, w // r, r, c).permute(0, 1, 3, 2, 4, 5)
        t = t.reshape(b, h // r, w // r, r * r * c)
        lead = (b, h * w // (r * r)) if grid is not None else (b, h // r, w // r)
    elif s > 1:
        t = apply_norm(x) if norm_position == "pre" else x
        t = t.reshape(-1, s * s * x.shape[-1])
        lead = (t.shape[0],)
    else:
        t = apply_norm(x) if norm_position == "pre" else x
        lead = tuple(x.shape[:-1])
    if norm_position == "post":
        t = apply_norm(t)
    t = t.reshape(-1, t.shape[-1])
    out = activation_fn(F.linear(t, w1, b1), activation)
    if w2 is not None:
        out = F.linear(out, w2, b2)
    return out.reshape(*lead, out.shape[-1])
