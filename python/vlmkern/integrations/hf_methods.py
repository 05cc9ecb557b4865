"""Model methods :func:`vlmkern.integrations.hf.patch_model` overrides on one HF model instance (an
instance attribute; the class is untouched): InternVL's ``pixel_shuffle`` and the Qwen2-VL
family's ``get_rope_index`` (M-RoPE positions by one device op: no Python loop, no host sync)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

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


_ROPE_INDEX = {
    "modeling_qwen2_vl.Qwen2VLModel": "qwen2_vl",
    "modeling_qwen2_5_vl.Qwen2_5_VLModel": "qwen2_5_vl",
    "modeling_qwen3_vl.Qwen3VLModel": "qwen3_vl",
    "modeling_qwen3_vl_moe.Qwen3VLMoeModel": "qwen3_vl",
}
_overridden: weakref.WeakSet = weakref.WeakSet()  # models holding an _Override attribute


def patch_methods(model: nn.Module, shuffle: bool, rope_index: bool) -> list[str]:
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
