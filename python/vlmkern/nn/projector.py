"""VLM connectors over :func:`vlmkern.ops.mlp_projector`, with the parameter names of HF
transformers 5.x so that ``load_state_dict(hf_module.state_dict(), strict=True)`` just works:
LLaVA(-NeXT/-OneVision), InternVL, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3 / SmolVLM, PaliGemma."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..ops.mlp_projector import mlp_projector
from ..ops.pixel_shuffle import pixel_shuffle
from ..reference.mlp_projector import activation_fn  # HF's ACT2FN math, for the unfused path
from ._fusable import fusable

# HF ACT2FN names -> the op's activation names.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "linear": "none",
}


def _plain(*modules: nn.Module) -> bool:
    """Whether mlp_projector may read these Linears' / norms' parameters (see fusable); else the
    connector calls its modules one by one."""
    return fusable(*modules, types=(nn.Linear, nn.LayerNorm, QwenRMSNorm, nn.Sequential, nn.GELU,
                                    _ModalityProjection))


def activation_from_hf(name: str) -> str:
    """The op's activation for an HF ``projector_hidden_act``; unsupported ones raise."""
    if name not in HF_ACTIVATIONS:
        raise ValueError(
            f"vlmkern.nn: activation {name!r} is not supported (known: {sorted(HF_ACTIVATIONS)})"
        )
    return HF_ACTIVATIONS[name]


class LlavaMultiModalProjector(nn.Module):
    """``linear_2(act(linear_1(x)))``: ``(..., in_features)`` → ``(..., out_features)``."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, act: str = "gelu"
    ) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias)
        self.activation = activation_from_hf(act)

    @classmethod
    def from_config(cls, config: Any) -> LlavaMultiModalProjector:
        """From a LlavaConfig / LlavaNextConfig / LlavaOnevisionConfig."""
        layers = config.vision_feature_layer
        n = 1 if isinstance(layers, int) else len(layers)
        return cls(config.vision_config.hidden_size * n, config.text_config.hidden_size,
                   getattr(config, "multimodal_projector_bias", True),
                   config.projector_hidden_act)  # fmt: skip

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        if not _plain(self.linear_1, self.linear_2):
            return self.linear_2(activation_fn(self.linear_1(image_features), self.activation))
        return mlp_projector(image_features, self.linear_1.weight, self.linear_1.bias,
                             self.linear_2.weight, self.linear_2.bias,
                             activation=self.activation)  # fmt: skip


class InternVLMultiModalProjector(nn.Module):
    """Pixel shuffle (r = 1/downsample_ratio) → LayerNorm(r²C) → Linear → act → Linear, fused.

    ``forward(x, grid=None)``: the ViT features with CLS dropped, ``(B, H, W, C)`` or ``(B, N, C)``
    with ``grid=(H, W)`` (a ``[:, 1:]`` view is read in place) → ``(B, H/r, W/r, D)`` or
    ``(B, N/r², D)``. With ``fuse_pixel_shuffle=False`` it takes HF's already-shuffled
    ``(..., r²C)`` input instead, exactly as HF's module does.
    """

    def __init__(
        self,
        vision_hidden_size: int,
        text_hidden_size: int,
        downsample_ratio: float = 0.5,
        act: str = "gelu",
        fuse_pixel_shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.scale = round(1 / downsample_ratio)
        if self.scale < 1 or abs(1 / downsample_ratio - self.scale) > 1e-6:
            raise ValueError(f"vlmkern.nn.InternVLMultiModalProjector: downsample_ratio must be "
                             f"1 / an integer (the pixel shuffle's factor), got "
                             f"{downsample_ratio}")
        features = vision_hidden_size * self.scale**2
        self.layer_norm = nn.LayerNorm(features)
        self.linear_1 = nn.Linear(features, text_hidden_size)
        self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size)
        self.activation = activation_from_hf(act)
        self.fuse_pixel_shuffle = fuse_pixel_shuffle

    @classmethod
    def from_config(cls, config: Any, fuse_pixel_shuffle: bool = True):
        return cls(config.vision_config.hidden_size, config.text_config.hidden_size,
                   config.downsample_ratio, config.projector_hidden_act,
                   fuse_pixel_shuffle)  # fmt: skip

    def forward(self, x: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        fused = self.fuse_pixel_shuffle and self.scale > 1
        ln = self.layer_norm
        if not _plain(ln, self.linear_1, self.linear_2):
            y = pixel_shuffle(x, self.scale, grid) if fused else x
            return self.linear_2(activation_fn(self.linear_1(ln(y)), self.activation))
        return mlp_projector(
            x, self.linear_1.weight, self.linear_1.bias, self.linear_2.weight,
            self.linear_2.bias, activation=self.activation, norm="layernorm",
            norm_weight=ln.weight, norm_bias=ln.bias, eps=ln.eps, norm_position="post",
            shuffle=self.scale if fused else None, grid=grid if fused else None,
        )  # fmt: skip


class QwenRMSNorm(nn.Module):
    """Qwen2RMSNorm / Qwen2_5_VLRMSNorm's parameters and math (fp32 statistics, weight last)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(x.dtype)


class _QwenMerger(nn.Module):
    """Qwen2-VL / 2.5-VL PatchMerger: ``ln_q`` on C, ``x.view(-1, s²C)``, ``mlp`` = Linear, GELU,
    Linear. ``forward(x)``: ``(T, C)`` tokens in merge-block order → ``(T/s², dim)``."""

    def __init__(self, dim: int, context_dim: int, spatial_merge_size: int, ln_q: nn.Module):
        super().__init__()
        self.spatial_merge_size = spatial_merge_size
        self.hidden_size = context_dim * spatial_merge_size**2
        self.ln_q = ln_q
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden_size, self.hidden_size),
            nn.GELU(),
            nn.Linear(self.hidden_size, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _plain(self.ln_q, self.mlp, *self.mlp) or self.mlp[1].approximate != "none":
            return self.mlp(self.ln_q(x).view(-1, self.hidden_size))
        rms = isinstance(self.ln_q, QwenRMSNorm)
        eps = self.ln_q.variance_epsilon if rms else self.ln_q.eps
        return mlp_projector(
            x, self.mlp[0].weight, self.mlp[0].bias, self.mlp[2].weight, self.mlp[2].bias,
            norm="rmsnorm" if rms else "layernorm", norm_weight=self.ln_q.weight,
            norm_bias=None if rms else self.ln_q.bias, eps=eps, merge=self.spatial_merge_size,
        )  # fmt: skip


class Qwen2VLPatchMerger(_QwenMerger):
    """Qwen2-VL's ``visual.merger``: LayerNorm(C, eps 1e-6) before the 2×2 merge."""

    def __init__(self, dim: int, context_dim: int, spatial_merge_size: int = 2) -> None:
        super().__init__(dim, context_dim, spatial_merge_size, nn.LayerNorm(context_dim, eps=1e-6))


class Qwen2_5_VLPatchMerger(_QwenMerger):  # noqa: N801 (HF's class name)
    """Qwen2.5-VL's ``visual.merger``: RMSNorm(C, eps 1e-6) before the 2×2 merge."""

    def __init__(self, dim: int, context_dim: int, spatial_merge_size: int = 2) -> None:
        super().__init__(dim, context_dim, spatial_merge_size, QwenRMSNorm(context_dim, eps=1e-6))


class Qwen3VLVisionPatchMerger(nn.Module):
    """Qwen3-VL's merger (``use_postshuffle_norm=False``: LayerNorm on C before the merge) and its
    DeepStack mergers (True: LayerNorm on s²C after it); ``(T, C)`` → ``(T/s², out_hidden)``."""

    def __init__(
        self,
        hidden_size: int,
        out_hidden_size: int,
        spatial_merge_size: int = 2,
        use_postshuffle_norm: bool = False,
    ) -> None:
        super().__init__()
        self.spatial_merge_size = spatial_merge_size
        self.hidden_size = hidden_size * spatial_merge_size**2
        self.use_postshuffle_norm = use_postshuffle_norm
        norm_features = self.hidden_size if use_postshuffle_norm else hidden_size
        self.norm = nn.LayerNorm(norm_features, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.hidden_size, self.hidden_size)
        self.act_fn = nn.GELU()
        self.linear_fc2 = nn.Linear(self.hidden_size, out_hidden_size)

    @classmethod
    def from_config(cls, config: Any, use_postshuffle_norm: bool = False):
        """From a Qwen3VLVisionConfig."""
        return cls(config.hidden_size, config.out_hidden_size, config.spatial_merge_size,
                   use_postshuffle_norm)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not _plain(self.norm, self.linear_fc1, self.act_fn, self.linear_fc2)
                or self.act_fn.approximate != "none"):
            rows = (self.norm(x.view(-1, self.hidden_size)) if self.use_postshuffle_norm
                    else self.norm(x).view(-1, self.hidden_size))
            return self.linear_fc2(self.act_fn(self.linear_fc1(rows)))
        return mlp_projector(
            x, self.linear_fc1.weight, self.linear_fc1.bias, self.linear_fc2.weight,
            self.linear_fc2.bias, norm="layernorm", norm_weight=self.norm.weight,
            norm_bias=self.norm.bias, eps=self.norm.eps,
            norm_position="post" if self.use_postshuffle_norm else "pre",
            merge=self.spatial_merge_size,
        )  # fmt: skip


class _ModalityProjection(nn.Module):
    def __init__(self, input_size: int, output_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_size, output_size, bias=False)


class Idefics3Connector(nn.Module):
    """Idefics3 / SmolVLM: pixel shuffle (r = scale_factor) of a square grid → one Linear without
    bias, fused. ``forward(x)``: ``(B, N, C)`` with N a square → ``(B, N/r², D)``."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, scale_factor: int = 2):
        super().__init__()
        self.scale_factor = scale_factor
        self.modality_projection = _ModalityProjection(
            vision_hidden_size * scale_factor**2, text_hidden_size
        )

    @classmethod
    def from_config(cls, config: Any) -> Idefics3Connector:
        """From an Idefics3Config / SmolVLMConfig."""
        return cls(config.vision_config.hidden_size, config.text_config.hidden_size,
                   config.scale_factor)  # fmt: skip

    def forward(self, image_hidden_states: torch.Tensor) -> torch.Tensor:
        side = int(image_hidden_states.shape[1] ** 0.5)
        if not _plain(self.modality_projection, self.modality_projection.proj):
            shuffled = pixel_shuffle(image_hidden_states, self.scale_factor, (side, side))
            return self.modality_projection.proj(shuffled)
        return mlp_projector(image_hidden_states, self.modality_projection.proj.weight,
                             activation="none", shuffle=self.scale_factor,
                             grid=(side, side))  # fmt: skip


SmolVLMConnector = Idefics3Connector


class PaliGemmaMultiModalProjector(nn.Module):
    """PaliGemma: one ``linear`` with bias, ``(..., vision_hidden)`` → ``(..., projection_dim)``."""

    def __init__(self, vision_hidden_size: int, projection_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(vision_hidden_size, projection_dim, bias=True)

    @classmethod
    def from_config(cls, config: Any) -> PaliGemmaMultiModalProjector:
        return cls(config.vision_config.hidden_size, config.vision_config.projection_dim)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        if not _plain(self.linear):
            return self.linear(image_features)
        return mlp_projector(image_features, self.linear.weight, self.linear.bias,
                             activation="none")  # fmt: skip
