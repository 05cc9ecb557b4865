"""RoPE modules: ``VisionRotary`` (Qwen2-VL-family ViT 2D RoPE) and ``MRotary`` (the LLM's M-RoPE),
each rotating q and k in one kernel launch. Build them from numbers or from an HF config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..ops.rope import mrope, vision_rope


class VisionRotary(nn.Module):
    """Replaces HF's ``Qwen2VLVisionRotaryEmbedding`` + ``apply_rotary_pos_emb_vision`` pair.

    ``forward(q, k, positions)``: q ``(N, Hq, D)``, k ``(N, Hk, D)``, positions int ``(N, 2)``
    (h, w) → rotated ``(q, k)``. No parameters or buffers.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.theta = int(head_dim), float(theta)

    @classmethod
    def from_config(cls, vision_config: Any) -> VisionRotary:
        """From an HF vision config (``head_dim`` or ``embed_dim / num_heads``, ``rope_theta``)."""
        head_dim = getattr(vision_config, "head_dim", None) or (
            getattr(vision_config, "embed_dim", None) or vision_config.hidden_size
        ) // vision_config.num_heads
        params = getattr(vision_config, "rope_parameters", None) or {}
        return cls(head_dim, params.get("rope_theta", 10000.0))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return vision_rope(q, k, positions, self.theta)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


class MRotary(nn.Module):
    """Replaces HF's ``Qwen2VLRotaryEmbedding`` (or Qwen2.5-VL's / Qwen3-VL's) followed by
    ``apply_rotary_pos_emb``.

    ``forward(q, k, position_ids)``: q ``(B, Hq, S, D)``, k ``(B, Hk, S, D)`` (or the module's
    ``layout``), position_ids int ``(3, B, S)`` (or ``(B, S)`` for text only) → rotated ``(q, k)``.
    No parameters or buffers.
    """

    def __init__(
        self,
        head_dim: int,
        mrope_section: Sequence[int],
        theta: float = 1000000.0,
        interleaved: bool = False,
        rotary_dim: int | None = None,
        layout: str = "bhsd",
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.head_dim = int(head_dim)
        self.mrope_section = tuple(int(s) for s in mrope_section)
        self.theta, self.interleaved = float(theta), bool(interleaved)
        self.rotary_dim = int(rotary_dim or head_dim)
        self.layout, self.scale = layout, float(scale)

    @classmethod
    def from_config(cls, text_config: Any, layout: str = "bhsd") -> MRotary:
        """From an HF Qwen2-VL / 2.5-VL / 3-VL text config (``rope_parameters``, ``model_type``)."""
        params = dict(getattr(text_config, "rope_parameters", None) or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"vlmkern.nn.MRotary: rope_type {rope_type!r} is not supported")
        head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        # As the HF modeling files: Qwen3-VL always interleaves, default sections per family.
        qwen3 = "qwen3" in str(getattr(text_config, "model_type", ""))
        section = params.get("mrope_section", [24, 20, 20] if qwen3 else [16, 24, 24])
        return cls(head_dim, section, params.get("rope_theta", 1000000.0), qwen3, layout=layout)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return mrope(q, k, position_ids, self.mrope_section, self.theta, self.interleaved,
                     self.rotary_dim, self.layout, self.scale)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, mrope_section={list(self.mrope_section)}, "
                f"theta={self.theta}, interleaved={self.interleaved}, layout={self.layout!r}")
