"""Reference RoPEs, restated from HF transformers (Qwen2-VL / 2.5-VL / 3-VL modeling files):
build cos/sin the way HF does (fp32 angles ``position.float() * inv_freq``), then rotate with
``rotate_half``. ``compute_dtype`` picks the arithmetic: float64 for ground truth, or ``None`` for
HF's own precision (text: cos/sin cast to the model dtype; vision: fp32 upcast)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def inv_freq(dim: int, theta: float) -> torch.Tensor:
    """HF default RoPE init: ``1 / theta ** (arange(0, dim, 2) / dim)`` in fp32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x, cos, sin, rotary_dim, compute_dtype):
    """x (..., D); cos/sin broadcastable to (..., rotary_dim). Partial rotary passes the rest."""
    out_dtype = x.dtype
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if compute_dtype is not None:
        rot, cos, sin = rot.to(compute_dtype), cos.to(compute_dtype), sin.to(compute_dtype)
    out = rot * cos + rotate_half(rot) * sin
    return torch.cat((out.to(out_dtype), rest), dim=-1)


def _angles(positions: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    return positions[..., None].float() * inv.to(positions.device)  # fp32, as HF


def rope(q, k, positions, theta=10000.0, rotary_dim=None, layout="bhsd", scale=1.0,
         compute_dtype=torch.float64):
    """1D RoPE: positions (B, S) (q/k 4-D) or (N,) (q/k packed (N, H, D))."""
    rotary_dim = rotary_dim or q.shape[-1]
    freqs = _angles(positions, inv_freq(rotary_dim, theta))
    emb = torch.cat((freqs, freqs), dim=-1)
    return _apply(q, k, emb.cos() * scale, emb.sin() * scale, rotary_dim, layout, compute_dtype)


def vision_rope(q, k, positions, theta=10000.0, compute_dtype=torch.float64):
    """Qwen2-VL vision RoPE: q (N, H, D), positions (N, 2) (h, w); HF upcasts to fp32."""
    d = q.shape[-1]
    freqs = _angles(positions, inv_freq(d // 2, theta))  # (N, 2, D/4)
    hw = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
    emb = torch.cat([hw, hw], dim=-1)
    cdt = torch.float32 if compute_dtype is None else compute_dtype
    cos, sin = emb.cos().unsqueeze(-2), emb.sin().unsqueeze(-2)
    return _rotate(q, cos, sin, d, cdt), _rotate(k, cos, sin, d, cdt)


def mrope_freqs(positions, mrope_section: Sequence[int], theta, interleaved, rotary_dim):
    """(3, ..., R/2) fp32 angles -> (..., R/2) recomposed per HF (sectioned or interleaved)."""
    freqs = _angles(positions, inv_freq(rotary_dim, theta))
    if interleaved:  # Qwen3-VL apply_interleaved_mrope
        out = freqs[0].clone()
        for dim, offset in enumerate((1, 2), start=1):
            idx = slice(offset, mrope_section[dim] * 3, 3)
            out[..., idx] = freqs[dim, ..., idx]
        return out
    chunks = freqs.split(list(mrope_section), dim=-1)
    return torch.cat([m[i % 3] for i, m in enumerate(chunks)], dim=-1)


def mrope(q, k, positions, mrope_section, theta=1000000.0, interleaved=False, rotary_dim=None,
          layout="bhsd", scale=1.0, compute_dtype=torch.float64):
    """M-RoPE: positions (3, B, S) (q/k 4-D) or (3, N) (packed)."""
    rotary_dim = rotary_dim or q.shape[-1]
    if positions.dim() == 2 and q.dim() == 4:
        positions = positions.unsqueeze(0).expand(3, -1, -1)
    freqs = mrope_freqs(positions, mrope_section, theta, interleaved, rotary_dim)
    emb = torch.cat((freqs, freqs), dim=-1)
    return _apply(q, k, emb.cos() * scale, emb.sin() * scale, rotary_dim, layout, compute_dtype)


def _apply(q, k, cos, sin, rotary_dim, layout, compute_dtype):
    if compute_dtype is None:  # HF text path: cos/sin in the model dtype, math in it too
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    if q.dim() == 3:  # packed (N, H, D): cos (N, R) -> (N, 1, R)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    else:
        dim = 1 if layout == "bhsd" else 2
        cos, sin = cos.unsqueeze(dim), sin.unsqueeze(dim)
    return (_rotate(q, cos, sin, rotary_dim, compute_dtype),
            _rotate(k, cos, sin, rotary_dim, compute_dtype))


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, compute_dtype=torch.float64):
    """HF's apply_rotary_pos_emb with given cos, sin (B, S, R) or (S, R); R <= D is rotated."""
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    layout = "bhsd" if unsqueeze_dim == 1 else "bshd"
    return _apply(q, k, cos, sin, cos.shape[-1], layout, compute_dtype)
