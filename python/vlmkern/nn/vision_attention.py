"""The Qwen2-VL / 2.5-VL / 3-VL ViT's attention over packed images (``qkv``, ``proj``: HF's names
and call signature): every image or window segment in one vlmkern.ops.cross_attention launch,
its 2D RoPE by vlmkern.ops.apply_rotary_pos_emb_vision; no host sync."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops.cross_attention import CUDA_DTYPES, CUDA_HEAD_DIMS, cross_attention
from ..ops.rope import apply_rotary_pos_emb_vision


def _sdpa_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float | None = None) -> torch.Tensor:
    """One segment's attention by torch SDPA as HF's Qwen2-VL calls it: q, k, v (n, H, D) ->
    (n, H, D) through one 4-D (1, H, n, D) call (CUDA's fused SDPA backends refuse 3-D inputs and
    leave them to the math backend)."""
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    return nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)[0].transpose(0, 1)


def _sdpa_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Packed attention within segments by torch SDPA, one _sdpa_segment call per segment as HF's
    SDPA path (whose host sync for the lengths it shares). q, k, v (N, H, D) -> (N, H, D)."""
    if cu_seqlens.numel() <= 2:
        return _sdpa_segment(q, k, v, scale)
    # empty segments (vision_grid's fixed-length boundaries end in them) hold no rows
    lengths = [n for n in (cu_seqlens[1:] - cu_seqlens[:-1]).tolist() if n]
    parts = zip(*(torch.split(t, lengths, 0) for t in (q, k, v)), strict=True)
    return torch.cat([_sdpa_segment(*p, scale) for p in parts], 0)


class QwenVisionAttention(nn.Module):
    """HF's ``VisionAttention`` / ``Qwen2_5_VLVisionAttention`` / ``Qwen3VLVisionAttention`` (and
    GLM-4.1V's ``Glm4vVisionAttention``, with its bias switches):
    ``proj(attention within segments(rope(qkv(x))))``.

    ``forward(hidden_states (N, dim), cu_seqlens (S + 1,) int, position_embeddings=(cos, sin)
    (N, head_dim) fp32, max_seqlen=None) -> (N, dim)``. The segments (images, video frames,
    Qwen2.5-VL's windows) run as one packed cross_attention. On CUDA that replaces HF's SDPA
    call per segment (the last H100 run's 11.7× over it, bench/results ``qwen2vl-vit 8x1024``,
    was against SDPA's math backend: the bench passed 3-D tensors; against the fused backends it
    is not yet measured); CUDA inputs the kernels do not take (fp32, other head dims) run HF's
    way, one 4-D SDPA call per segment. On the CPU a single segment runs SDPA, whose flash
    kernel is the faster one there.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 proj_bias: bool = True) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        self._projections(dim, qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _projections(self, dim: int, bias: bool) -> None:
        self.qkv = nn.Linear(dim, dim * 3, bias=bias)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (N, heads, head_dim) views of the projections."""
        return self.qkv(x).reshape(x.shape[0], 3, self.num_heads, -1).unbind(1)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                max_seqlen: int | None = None, **kwargs: Any) -> torch.Tensor:
        n = hidden_states.shape[0]
        q, k, v = self._qkv(hidden_states)
        if position_embeddings is not None:
            q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        if q.is_cuda:
            kernel = q.dtype in CUDA_DTYPES and self.head_dim in CUDA_HEAD_DIMS
        else:  # the CPU's SDPA is faster on one segment (a data-dependent test when compiling)
            kernel = torch.compiler.is_compiling() or cu_seqlens.numel() > 2
        if kernel:
            out = cross_attention(q, k, v, scale=self.scaling, cu_seqlens_q=cu_seqlens,
                                  cu_seqlens_k=cu_seqlens)
        else:
            out = _sdpa_segments(q, k, v, cu_seqlens, self.scaling)
        return self.proj(out.reshape(n, -1))


class Qwen2_5OmniVisionAttention(QwenVisionAttention):
    """Qwen2.5-Omni's ViT attention: the same, with separate ``q``, ``k``, ``v`` Linears."""

    def _projections(self, dim: int, bias: bool) -> None:
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (x.shape[0], self.num_heads, -1)
        return self.q(x).reshape(shape), self.k(x).reshape(shape), self.v(x).reshape(shape)
