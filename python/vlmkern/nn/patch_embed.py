"""Vision embedding modules over vlmkern.ops.patch_embed whose parameter / buffer names match HF's
(CLIP, SigLIP, InternVL vision embeddings, Qwen2-VL PatchEmbed, Qwen3-VL patch embed + pos_embed),
so ``load_state_dict(hf_module.state_dict(), strict=True)`` works. Optional ``mean`` / ``std`` /
``rescale`` let them take raw uint8 pixels (the processor's normalization folded into the GEMM)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..ops.patch_embed import patch_embed
from ._fusable import fusable, input_grad_hooks

_TYPES = (nn.Conv2d, nn.Conv3d, nn.Embedding)


def _check_fusable(owner: nn.Module, *modules: nn.Module, types: tuple = _TYPES) -> list:
    """The op reads the conv's / embedding's parameters directly: a wrapped (PEFT adapter,
    quantized) or hooked module would be silently bypassed, so it is refused instead. HF's
    input-grad hooks (gradient checkpointing puts one on the vision tower's input embeddings, the
    patch conv) are allowed: returned, for :func:`_run_hooks` on the op's output. Global module
    hooks (FlopCounterMode's) see this module's call, not its conv's: there is no unfused path."""
    if not fusable(*modules, types=types, input_grad_hooks_ok=True, global_hooks_ok=True):
        raise NotImplementedError(
            f"vlmkern.nn.{type(owner).__name__}: its patch conv or position embedding is wrapped "
            "or hooked (e.g. a PEFT adapter or a forward hook), which this fused module would "
            "bypass: merge the adapter into the weights, remove the hook, or use HF's module")
    return [(m, h) for m in modules for h in input_grad_hooks(m)]


def _run_hooks(hooks: list, pixels: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """HF's input-grad hooks of the fused conv, on the tokens (they make the output require
    grad, whatever its shape)."""
    for module, hook in hooks:
        result = hook(module, (pixels,), out)
        out = out if result is None else result
    return out


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


class _Normalizing(nn.Module):
    """Holds the (non-state) pixel normalization passed to the op."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None,
                 rescale: float) -> None:
        super().__init__()
        self.pixel_mean = None if mean is None else [float(x) for x in mean]
        self.pixel_std = None if std is None else [float(x) for x in std]
        self.rescale = float(rescale)

    def _norm(self) -> dict[str, Any]:
        """Op keywords: the normalization, and crop=True for the image modules (HF's Conv2d
        drops trailing pixels that do not fill a patch)."""
        return {"mean": self.pixel_mean, "std": self.pixel_std, "rescale": self.rescale}

    def _image_kw(self) -> dict[str, Any]:
        return {**self._norm(), "crop": True}


class CLIPVisionEmbeddings(_Normalizing):
    """HF ``CLIPVisionEmbeddings``: Conv2d (no bias) + CLS + learned positions (bicubic-resized
    when ``interpolate_pos_encoding``). pixels ``(B, C, H, W)`` float or uint8 ->
    ``(B, 1 + (H/P)(W/P), D)``."""

    def __init__(self, config: Any, mean=None, std=None, rescale: float = 1.0) -> None:
        super().__init__(mean, std, rescale)
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(self.embed_dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, self.embed_dim,
                                         kernel_size=self.patch_size, stride=self.patch_size,
                                         bias=False)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.register_buffer("position_ids", torch.arange(self.num_positions).expand((1, -1)),
                             persistent=False)

    def forward(self, pixel_values: torch.Tensor,
                interpolate_pos_encoding: bool = False) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if not interpolate_pos_encoding and (height, width) != (self.image_size,) * 2:
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model "
                             f"({self.image_size}*{self.image_size}).")
        hooks = _check_fusable(self, self.patch_embedding, self.position_embedding)
        out = patch_embed(pixel_values, self.patch_embedding.weight,
                          pos_embed=self.position_embedding.weight,
                          cls_token=self.class_embedding, **self._image_kw())
        return _run_hooks(hooks, pixel_values, out)


class SiglipVisionEmbeddings(_Normalizing):
    """HF ``SiglipVisionEmbeddings``: Conv2d with bias + learned positions, no CLS.
    pixels ``(B, C, H, W)`` -> ``(B, (H/P)(W/P), D)``."""

    def __init__(self, config: Any, mean=None, std=None, rescale: float = 1.0) -> None:
        super().__init__(mean, std, rescale)
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, self.embed_dim,
                                         kernel_size=self.patch_size, stride=self.patch_size,
                                         padding="valid")
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.register_buffer("position_ids", torch.arange(self.num_positions).expand((1, -1)),
                             persistent=False)

    def forward(self, pixel_values: torch.Tensor,
                interpolate_pos_encoding: bool = False) -> torch.Tensor:
        conv = self.patch_embedding
        hooks = _check_fusable(self, conv, self.position_embedding)
        out = patch_embed(pixel_values, conv.weight, conv.bias,
                          pos_embed=self.position_embedding.weight,
                          pos_interp="bicubic" if interpolate_pos_encoding else "none",
                          **self._image_kw())
        return _run_hooks(hooks, pixel_values, out)


class Blip2VisionEmbeddings(_Normalizing):
    """HF ``Blip2VisionEmbeddings`` (also BLIP's and InstructBLIP's, EVA-style): Conv2d with bias +
    CLS + a learned ``(1, 1 + N, D)`` position table. With ``interpolate_pos_encoding`` the patch
    positions are bicubic-resized to the grid; without it HF adds the table's first tokens (a
    smaller image takes a prefix of the rows).
    pixels ``(B, C, H, W)`` -> ``(B, 1 + (H/P)(W/P), D)``.
    """

    def __init__(self, config: Any, mean=None, std=None, rescale: float = 1.0) -> None:
        super().__init__(mean, std, rescale)
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(3, self.embed_dim, kernel_size=self.patch_size,
                                         stride=self.patch_size)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_positions, self.embed_dim))

    def forward(self, pixel_values: torch.Tensor,
                interpolate_pos_encoding: bool = False) -> torch.Tensor:
        conv = self.patch_embedding
        hooks = _check_fusable(self, conv)
        pos, interp = self.position_embedding, "bicubic"
        if not interpolate_pos_encoding:
            p = self.patch_size
            tokens = 1 + (pixel_values.shape[-2] // p) * (pixel_values.shape[-1] // p)
            if tokens > self.num_positions:
                raise ValueError(f"vlmkern.nn.Blip2VisionEmbeddings: {tokens} tokens but "
                                 f"{self.num_positions} positions; pass "
                                 "interpolate_pos_encoding=True")
            pos, interp = pos[:, :tokens], "none"
        out = patch_embed(pixel_values, conv.weight, conv.bias, pos_embed=pos,
                          cls_token=self.class_embedding, pos_interp=interp, **self._image_kw())
        return _run_hooks(hooks, pixel_values, out)


class _InternVLPatchEmbeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        patch = _pair(config.patch_size)
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=patch,
                                    stride=patch)


class InternVLVisionEmbeddings(_Normalizing):
    """HF ``InternVLVisionEmbeddings`` (InternViT): Conv2d with bias + CLS + positions
    (bicubic-resized to the grid when it differs). Dropout as HF; ``bool_masked_pos`` is not
    supported. pixels ``(B, C, H, W)`` -> ``(B, 1 + (H/P)(W/P), D)``."""

    def __init__(self, config: Any, mean=None, std=None, rescale: float = 1.0) -> None:
        super().__init__(mean, std, rescale)
        dim = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.use_mask_token else None
        self.patch_embeddings = _InternVLPatchEmbeddings(config)
        image, patch = _pair(config.image_size), _pair(config.patch_size)
        self.patch_size = patch
        num_patches = (image[0] // patch[0]) * (image[1] // patch[1])
        self.position_embeddings = (nn.Parameter(torch.zeros(1, num_patches + 1, dim))
                                    if config.use_absolute_position_embeddings else None)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor,
                bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        if bool_masked_pos is not None:
            raise ValueError("vlmkern.nn.InternVLVisionEmbeddings: bool_masked_pos is not "
                             "supported")
        conv = self.patch_embeddings.projection
        # HF's get_input_embeddings() is the patch_embeddings container (never called here)
        hooks = _check_fusable(self, conv, self.patch_embeddings,
                               types=(nn.Conv2d, _InternVLPatchEmbeddings))
        out = patch_embed(pixel_values, conv.weight, conv.bias,
                          pos_embed=self.position_embeddings, cls_token=self.cls_token,
                          **self._image_kw())
        return self.dropout(_run_hooks(hooks, pixel_values, out))


class Qwen2VLPatchEmbed(_Normalizing):
    """HF Qwen2-VL / 2.5-VL ``PatchEmbed``: Conv3d (no bias) on pre-patchified rows.
    ``hidden_states`` with ``C·T·P·P`` values per row -> ``(N, D)``."""

    def __init__(self, patch_size: int = 14, temporal_patch_size: int = 2, in_channels: int = 3,
                 embed_dim: int = 1152, mean=None, std=None, rescale: float = 1.0) -> None:
        super().__init__(mean, std, rescale)
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        kernel = [temporal_patch_size, patch_size, patch_size]
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel,
                              bias=False)

    def forward(self, hidden_states: torch.Tensor,
                grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        hooks = _check_fusable(self, self.proj)
        rows = hidden_states.reshape(-1, self.proj.weight[0].numel())
        if grid_thw is None:  # one pseudo-image covering every row
            grid_thw = torch.tensor([[1, 1, rows.shape[0]]], device=rows.device)
        tokens, _ = patch_embed(rows, self.proj.weight, self.proj.bias, grid_thw=grid_thw,
                                **self._norm())
        return _run_hooks(hooks, hidden_states, tokens)


class _Qwen3Proj(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        t, p = config.temporal_patch_size, config.patch_size
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=[t, p, p],
                              stride=[t, p, p], bias=True)


class Qwen3VLPatchEmbed(_Normalizing):
    """Qwen3-VL's vision input stage: ``patch_embed.proj`` (Conv3d with bias) + ``pos_embed``
    (learned S×S table, resampled bilinearly with align_corners=True to each image's grid in
    merge-block order), with the key names of HF ``Qwen3VLVisionModel``.
    forward(hidden_states (N, C·T·P·P), grid_thw (n, 3)) -> (tokens (N, D), cu_seqlens)."""

    def __init__(self, config: Any, mean=None, std=None, rescale: float = 1.0) -> None:
        super().__init__(mean, std, rescale)
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_embed = _Qwen3Proj(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor,
                grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self.patch_embed.proj
        hooks = _check_fusable(self, proj, self.pos_embed)
        rows = hidden_states.reshape(-1, proj.weight[0].numel())
        tokens, cu_seqlens = patch_embed(rows, proj.weight, proj.bias,
                                         pos_embed=self.pos_embed.weight, grid_thw=grid_thw,
                                         spatial_merge_size=self.spatial_merge_size,
                                         **self._norm())
        return _run_hooks(hooks, hidden_states, tokens), cu_seqlens
