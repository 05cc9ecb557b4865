"""LLaVA-1.5 / LLaVA-style VLMs from vlmkern pieces: a CLIP or SigLIP tower
(:mod:`vlmkern.models.vision_transformer`), vlmkern's ``LlavaMultiModalProjector`` and HF's
language model, built from a ``transformers`` ``LlavaForConditionalGeneration``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..nn.projector import LlavaMultiModalProjector
from ._common import copy_of, hf_parts, pixel_dtype
from .vision_transformer import CLIPVisionTransformer, SiglipVisionTransformer
from .vlm import VisionLanguageModel

_STRATEGIES = ("default", "full")
_TOWERS = {"CLIPVisionModel": CLIPVisionTransformer, "SiglipVisionModel": SiglipVisionTransformer}


def vision_tower_from_hf(tower: nn.Module, **normalization: Any) -> nn.Module:
    """vlmkern's tower for HF's ``CLIPVisionModel`` / ``SiglipVisionModel``, on its device and
    dtype, weights copied. ``normalization``: ``mean`` / ``std`` / ``rescale`` for uint8 pixels
    (see :class:`vlmkern.models.CLIPVisionTransformer`)."""
    name = type(tower).__name__
    if name not in _TOWERS:
        raise NotImplementedError(f"vlmkern.models: no vision tower for HF's {name} (supported: "
                                  f"{', '.join(_TOWERS)})")
    return _TOWERS[name].from_hf(tower, **normalization)


class Llava(VisionLanguageModel):
    """``lm_head(LLM(embeds with projector(tower(pixels)[feature_layer]) in the image tokens)))``.

    ``vision_tower.hidden_states(pixels (B, C, H, W), layers) -> [(B, T, C_v)]``;
    ``feature_layer``: one layer, or a list whose states are concatenated along the channels (as
    HF, the projector then takes n C_v); ``select_strategy`` "default" drops the CLS row (CLIP),
    "full" keeps every row; each image gives T (or T - 1) features for as many
    ``image_token_id`` placeholders. ``forward(input_ids,
    pixel_values=None, ...)``: see :meth:`VisionLanguageModel.forward`."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, language_model: nn.Module,
                 lm_head: nn.Module, *, image_token_id: int,
                 feature_layer: int | Sequence[int] = -2,
                 select_strategy: str = "default") -> None:
        super().__init__(language_model, lm_head)
        if select_strategy not in _STRATEGIES:
            raise ValueError(f"vlmkern.models.Llava: select_strategy must be one of "
                             f"{_STRATEGIES}, got {select_strategy!r}")
        layers = (list(feature_layer) if isinstance(feature_layer, (list, tuple))
                  else [feature_layer])
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"vlmkern.models.Llava: feature_layer must be an int or a non-empty "
                             f"list of ints, got {feature_layer!r}")
        self.vision_tower, self.multi_modal_projector = vision_tower, projector
        self.image_token_id, self.feature_layer = image_token_id, feature_layer
        self._layers = layers
        self.select_strategy = select_strategy

    @classmethod
    def from_hf(cls, model: nn.Module, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, rescale: float = 1.0) -> Llava:
        """From a ``LlavaForConditionalGeneration``: vlmkern's tower and projector hold copies of
        HF's weights; the language model and LM head are HF's modules themselves (shared).
        ``mean`` / ``std`` / ``rescale``: the image processor's normalization, folded into the
        patch embedding; the model then takes raw pixels (uint8, or floats of the same values).
        Without them it takes normalized float pixels, as HF."""
        config, inner = hf_parts("Llava", model)
        if config.model_type != "llava":  # -NeXT / -OneVision: any-res tiles, image_newline
            raise NotImplementedError(f"vlmkern.models.Llava: only LLaVA-1.5-style models "
                                      f"(model_type 'llava'), got {config.model_type!r}")
        projector = copy_of(lambda: LlavaMultiModalProjector.from_config(config),
                            inner.multi_modal_projector)
        tower = vision_tower_from_hf(inner.vision_tower, mean=mean, std=std, rescale=rescale)
        return cls(tower, projector, inner.language_model, model.lm_head,
                   image_token_id=config.image_token_id,
                   feature_layer=config.vision_feature_layer,
                   select_strategy=config.vision_feature_select_strategy)

    def vision_features(self, pixel_values: torch.Tensor | None = None,
                        **unused: Any) -> dict[int, torch.Tensor]:
        """pixel_values (B, C, H, W) float (cast to the tower's dtype) or uint8 (given the
        normalization at construction) -> {image_token_id: (B · T, D)}."""
        if unused:
            raise TypeError(f"vlmkern.models.Llava: unexpected inputs {sorted(unused)}")
        if pixel_values is None:
            return {}
        if pixel_values.is_floating_point():
            pixel_values = pixel_values.to(pixel_dtype(self.vision_tower))
        states = self.vision_tower.hidden_states(pixel_values, self._layers)  # [(B, T, C_v)]
        if self.select_strategy == "default":
            states = [h[:, 1:] for h in states]
        h = states[0] if len(states) == 1 else torch.cat(states, -1)  # (B, T, n C_v), as HF
        return {self.image_token_id: self.multi_modal_projector(h).flatten(0, 1)}
