"""Model methods :func:`vlmkern.integrations.hf.patch_model` overrides on one HF model instance (an
instance attribute; the class is untouched): InternVL's ``pixel_shuffle``, the Qwen2-VL
family's ``get_rope_index`` (M-RoPE positions by one device op: no Python loop, no host sync)
and, by a forward pre-hook, the index tensors the Qwen-family ViTs' forward takes precomputed
(computed on the device: :func:`vision_indices`)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..nn.vision_attention import QwenVisionAttention
from ..ops import vision_grid
from ..ops.mrope_position_ids import mrope_position_ids
from ..ops.pixel_shuffle import pixel_shuffle
from .hf_builders import builder_key, is_hf


class _Override:
    """Base of the overrides: what :func:`unpatch_methods` removes."""


class _InternVLPixelShuffle(_Override):
    """InternVLModel.pixel_shuffle(vision_features (B, H, W, C), scale_factor) as one vlmkern
    pixel_shuffle (the same channel order); other scale factors go to HF's function (which
    reads nothing from the model)."""

    def __init__(self, hf_function) -> None:
        self.hf_function = hf_function

    def __call__(self, vision_features: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        r = round(1 / scale_factor)
        if r < 1 or r * scale_factor != 1:
            return self.hf_function(None, vision_features, scale_factor=scale_factor)
        return pixel_shuffle(vision_features, r)


class _RopeIndex(_Override):
    """``get_rope_index`` of Qwen2VLModel / Qwen2_5_VLModel / Qwen3VLModel (-MoE) with HF's
    arguments, by :func:`vlmkern.ops.mrope_position_ids` (bit-identical to transformers 5.x).
    A deep copy of the model keeps the override; ``unpatch_functions`` removes it from the
    patched instances only."""

    def __init__(self, kind: str, config: Any) -> None:
        vision = config.vision_config
        self.kind = kind
        self.options = dict(model=kind, spatial_merge_size=vision.spatial_merge_size,
                            image_token_id=config.image_token_id,
                            video_token_id=config.video_token_id)
        if kind == "qwen2_5_vl":
            self.options["tokens_per_second"] = vision.tokens_per_second

    def __call__(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None = None,
                 image_grid_thw: torch.Tensor | None = None,
                 video_grid_thw: torch.Tensor | None = None, *args: Any,
                 attention_mask: torch.Tensor | None = None,
                 second_per_grid_ts: torch.Tensor | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if args:  # HF's positional order: Qwen2.5-VL has second_per_grid_ts before the mask
            if self.kind == "qwen2_5_vl":
                second_per_grid_ts, *args = args
            if args:
                attention_mask = args[0]
        # HF reads the grids on the host and the mask as .bool(): any device, any mask dtype
        device = input_ids.device

        def here(t):
            return t.to(device) if isinstance(t, torch.Tensor) else t

        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask != 0
        extra = {"second_per_grid_ts": here(second_per_grid_ts)} if self.kind == "qwen2_5_vl" \
            else {}
        return mrope_position_ids(input_ids, here(mm_token_type_ids), here(image_grid_thw),
                                  here(video_grid_thw), here(attention_mask), **self.options,
                                  **extra)


# HF vision tower -> (windows, position-table taps)
_TOWERS = {
    "modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel": (False, False),
    "modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel": (True, False),
    "modeling_qwen2_5_omni.Qwen2_5OmniVisionEncoder": (True, False),
    "modeling_qwen3_vl.Qwen3VLVisionModel": (False, True),
    "modeling_qwen3_vl_moe.Qwen3VLMoeVisionModel": (False, True),
}


def vision_indices(tower: nn.Module, grid_thw: torch.Tensor, num_patches: int, *,
                   device: torch.device | None = None, exact: bool = False) -> dict[str, Any]:
    """The index tensors a Qwen-family HF ViT (Qwen2-VL / 2.5-VL / 3-VL / 3-VL-MoE, Qwen2.5-Omni)
    accepts precomputed, by :mod:`vlmkern.ops.vision_grid` on ``grid_thw``'s device (no host
    sync): ``position_ids``, ``cu_seqlens``, Qwen2.5-VL's ``window_index`` /
    ``cu_window_seqlens``, Qwen3-VL's ``interp_indices`` / ``interp_weights`` (bilinear tables).
    Pass them as ``tower(pixels, grid_thw=grid, **indices)``. The ``cu_seqlens`` tensors have a
    fixed length (trailing empty segments, which vlmkern's attention skips and HF's SDPA loop
    does not) unless ``exact``."""
    windows, taps = _TOWERS[builder_key(tower)]
    merge = tower.spatial_merge_size
    out = {"position_ids": vision_grid.vision_position_ids(grid_thw, num_patches, merge),
           "cu_seqlens": vision_grid.vision_cu_seqlens(grid_thw, num_patches, exact=exact)}
    if windows:
        out["window_index"], out["cu_window_seqlens"] = vision_grid.vision_window_index(
            grid_thw, num_patches, merge, tower.window_size, tower.patch_size, exact=exact)
    if taps and tower.interpolation_mode == "bilinear":
        out["interp_indices"], out["interp_weights"] = vision_grid.vision_interp_taps(
            grid_thw, num_patches, merge, tower.num_grid_per_side,
            tower.interpolation_align_corners)
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


class _VisionIndices(_Override):
    """Forward pre-hook (with kwargs) of a Qwen-family ViT: hands HF's forward its index tensors
    (HF's precomputed-kwargs path) from :func:`vision_indices`, where HF derives them in Python
    loops over ``grid_thw.tolist()`` (host syncs, unbacked symbols under compile, no CUDA-graph
    capture). Only while every block's attention is vlmkern's, which takes the fixed-length
    ``cu_seqlens`` (exact, as HF's, for a grid on the CPU outside compile); values the caller
    passes win. A hook, not an instance ``forward``: it holds no reference to the tower."""

    def __call__(self, tower: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
        if hidden is None or grid is None or not all(
                isinstance(b.attn, QwenVisionAttention) for b in tower.blocks):
            return None
        exact = grid.device.type == "cpu" and not torch.compiler.is_compiling()
        given = vision_indices(tower, grid, hidden.shape[0], device=hidden.device, exact=exact)
        return args, {**given, **kwargs}


_ROPE_INDEX = {
    "modeling_qwen2_vl.Qwen2VLModel": "qwen2_vl",
    "modeling_qwen2_5_vl.Qwen2_5_VLModel": "qwen2_5_vl",
    "modeling_qwen3_vl.Qwen3VLModel": "qwen3_vl",
    "modeling_qwen3_vl_moe.Qwen3VLMoeModel": "qwen3_vl",
}
_overridden: weakref.WeakSet = weakref.WeakSet()  # models holding an _Override attribute
_handles: list[RemovableHandle] = []  # the vision towers' pre-hooks


def patch_methods(model: nn.Module, shuffle: bool, rope_index: bool,
                  indices: bool) -> list[str]:
    """Override the methods on the HF models inside ``model``; returns ``path.method`` names."""
    done = []
    for path, m in model.named_modules():
        if not is_hf(m):
            continue
        key, where = builder_key(m), path or "<root>"
        if shuffle and key == "modeling_internvl.InternVLModel" and "pixel_shuffle" not in vars(m):
            m.pixel_shuffle = _InternVLPixelShuffle(type(m).pixel_shuffle)
            done.append(f"{where}.pixel_shuffle")
        if rope_index and key in _ROPE_INDEX and "get_rope_index" not in vars(m):
            m.get_rope_index = _RopeIndex(_ROPE_INDEX[key], m.config)
            done.append(f"{where}.get_rope_index")
        if indices and key in _TOWERS and not any(
                isinstance(h, _VisionIndices) for h in m._forward_pre_hooks.values()):
            _handles.append(m.register_forward_pre_hook(_VisionIndices(), with_kwargs=True))
            done.append(f"{where}.forward (pre-hook: vision_grid indices)")
        if key in ("modeling_internvl.InternVLModel", *_ROPE_INDEX):
            _overridden.add(m)
    return done


def unpatch_methods() -> None:
    """Remove every override :func:`patch_methods` set (the classes' methods show again)."""
    for m in list(_overridden):
        for name, value in list(vars(m).items()):
            if isinstance(value, _Override):
                delattr(m, name)
    _overridden.clear()
    for handle in _handles:
        handle.remove()
    _handles.clear()
