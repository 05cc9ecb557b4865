"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL (-MoE) from vlmkern pieces: the vision tower of
:mod:`vlmkern.models.qwen_vision`, M-RoPE positions from ``vlmkern.ops.mrope_position_ids``
(one device op, no host sync) and HF's language model, built from a ``transformers``
``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VL...`` / ``Qwen3VL...`` / ``Qwen3VLMoe...``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops.mrope_position_ids import mrope_position_ids
from ._common import hf_parts
from .qwen_vision import (
    Qwen2_5_VLVisionTransformer,
    Qwen2VLVisionTransformer,
    Qwen3VLVisionTransformer,
)
from .vlm import VisionLanguageModel, scatter_features, text_positions

# forward's keyword inputs besides the LLM's (what the HF processors return for these models)
_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
           "mm_token_type_ids", "second_per_grid_ts")
_TOWERS = {"qwen2_vl": Qwen2VLVisionTransformer, "qwen2_5_vl": Qwen2_5_VLVisionTransformer,
           "qwen3_vl": Qwen3VLVisionTransformer, "qwen3_vl_moe": Qwen3VLVisionTransformer}


class QwenVL(VisionLanguageModel):
    """``lm_head(LLM(embeds with visual(pixels, grid) in the image / video tokens,
    M-RoPE positions)))``.

    ``visual(pixel_values (N, C·T·P·P), grid_thw (n, 3)) -> (N / m², D)``. ``forward(input_ids,
    pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
    mm_token_type_ids=None, second_per_grid_ts=None, ...)``: the positions of a prefill come
    from ``mrope_position_ids`` (and ``rope_deltas``, returned); a decode step (cache not
    empty) counts on from the ``rope_deltas`` passed back, as HF's ``generate`` does (see
    :meth:`positions`). Qwen3-VL: the tower's DeepStack features go to the LLM as HF's
    ``visual_pos_masks`` / ``deepstack_visual_embeds`` (added to the image / video rows after
    its first layers)."""

    def __init__(self, visual: nn.Module, language_model: nn.Module, lm_head: nn.Module, *,
                 model: str, image_token_id: int, video_token_id: int,
                 spatial_merge_size: int = 2, tokens_per_second: float = 2) -> None:
        super().__init__(language_model, lm_head)
        if model not in _TOWERS:
            raise ValueError(f"vlmkern.models.QwenVL: model must be one of {sorted(_TOWERS)}, "
                             f"got {model!r}")
        self.visual, self.model = visual, model
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        self.spatial_merge_size, self.tokens_per_second = spatial_merge_size, tokens_per_second

    @classmethod
    def from_hf(cls, model: nn.Module) -> QwenVL:
        """From a ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VL...`` / ``Qwen3VL...`` /
        ``Qwen3VLMoeForConditionalGeneration``:
        the tower holds copies of HF's weights; the language model and LM head are HF's."""
        config, inner = hf_parts("QwenVL", model)
        family = config.model_type
        if family not in _TOWERS:
            raise NotImplementedError(f"vlmkern.models.QwenVL: no support for {family!r}")
        vision = config.vision_config
        return cls(_TOWERS[family].from_hf(inner.visual), inner.language_model, model.lm_head,
                   model=family, image_token_id=config.image_token_id,
                   video_token_id=config.video_token_id,
                   spatial_merge_size=vision.spatial_merge_size,
                   tokens_per_second=getattr(vision, "tokens_per_second", 2))

    def _dtype(self) -> torch.dtype:  # the dtype HF casts the pixels to
        return next(self.visual.parameters()).dtype

    def vision_features(self, **vision_inputs: Any) -> dict[int, torch.Tensor]:
        """``pixel_values`` / ``pixel_values_videos`` (N, C·T·P·P) and ``image_grid_thw`` /
        ``video_grid_thw`` -> {image / video token id: merged features (N / m², D)}."""
        return {token: feats[0] for token, feats in self._encode(vision_inputs).items()}

    def _encode(self, vision_inputs: dict[str, Any]) -> dict[int, tuple]:
        """{image / video token id: the tower's ``forward_features``}: (merged, last hidden
        state) and, for Qwen3-VL, its DeepStack features. Unknown keywords raise TypeError."""
        unknown = set(vision_inputs) - set(_INPUTS)
        if unknown:
            raise TypeError(f"vlmkern.models.QwenVL: unexpected inputs {sorted(unknown)} (it "
                            f"takes {', '.join(_INPUTS)})")
        out = {}
        for token, kind in ((self.image_token_id, "image"), (self.video_token_id, "video")):
            pixels = vision_inputs.get("pixel_values" if kind == "image" else
                                       "pixel_values_videos")
            grid = vision_inputs.get(f"{kind}_grid_thw")
            if pixels is not None:
                if grid is None:
                    raise ValueError(f"vlmkern.models.QwenVL: {kind} pixels given without "
                                     f"{kind}_grid_thw")
                out[token] = self.visual.forward_features(pixels.to(self._dtype()), grid)
        return out

    def language_inputs(self, input_ids: torch.Tensor, **vision_inputs: Any
                        ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Token embeddings with the merged image / video features in their placeholder rows;
        for Qwen3-VL also the DeepStack inputs of HF's text model."""
        encoded = self._encode(vision_inputs)
        embeds = self.embed(input_ids, {token: feats[0] for token, feats in encoded.items()})
        if not self.model.startswith("qwen3") or not encoded:
            return embeds, {}
        # DeepStack, per level: the (visual rows, D) features in sequence order, images and
        # videos interleaved as their placeholders are. The row count is the features' (no
        # boolean-mask selection, no host sync); HF's text model then adds them by a mask.
        visual = sum(input_ids == token for token in encoded).bool()  # (B, S)
        rows = sum(feats[0].shape[0] for feats in encoded.values())
        order = torch.argsort((~visual).flatten().int(), stable=True)[:rows]  # visual positions
        deepstack = []
        for level in zip(*(feats[2] for feats in encoded.values()), strict=True):
            if len(level) == 1:
                deepstack.append(level[0])
                continue
            full = torch.zeros_like(embeds)
            for token, feats in zip(encoded, level, strict=True):
                full = scatter_features(full, input_ids, token, feats)
            deepstack.append(full.flatten(0, 1)[order])
        return embeds, {"visual_pos_masks": visual, "deepstack_visual_embeds": deepstack}

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int,
                  rope_deltas: torch.Tensor | None, vision_inputs: dict[str, Any],
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, B, S) int64 M-RoPE positions and (3, B, 1) rope_deltas. A prefill takes
        ``mrope_position_ids``' (image / video tokens found by ``mm_token_type_ids`` or, without
        it, by their token ids; HF's Qwen2 / 2.5 fall back to text positions then, Qwen3
        raises); the tokens after it count on from its last token's position + 1, as HF's
        ``generate`` does. ``second_per_grid_ts`` in bf16 / fp16 is widened to fp32 (exactly)
        first: HF multiplies in that dtype, which can round a video position differently."""
        b, s = input_ids.shape
        grids = vision_inputs.get("image_grid_thw"), vision_inputs.get("video_grid_thw")
        if past and any(g is not None for g in grids):
            raise NotImplementedError("vlmkern.models.QwenVL: images or videos after the first "
                                      "turn (a non-empty cache) are not supported")
        if past and rope_deltas is not None:  # decode: text positions moved by the deltas
            text = text_positions(attention_mask, b, s, past, input_ids.device)  # (B, S)
            return text[None] + rope_deltas, rope_deltas
        if past:
            raise ValueError("vlmkern.models.QwenVL: a step with a non-empty cache needs the "
                             "rope_deltas its prefill returned")
        seconds = vision_inputs.get("second_per_grid_ts")
        if isinstance(seconds, torch.Tensor) and seconds.dtype in (torch.bfloat16, torch.float16):
            seconds = seconds.float()
        pos, _ = mrope_position_ids(
            input_ids, vision_inputs.get("mm_token_type_ids"), *grids, attention_mask,
            model="qwen3_vl" if self.model.startswith("qwen3") else self.model,
            spatial_merge_size=self.spatial_merge_size, image_token_id=self.image_token_id,
            video_token_id=self.video_token_id, second_per_grid_ts=seconds,
            tokens_per_second=self.tokens_per_second)  # (3, B, S)
        real = s if attention_mask is None else attention_mask.sum(-1).view(1, b, 1)
        return pos, pos[:, :, -1:] + 1 - real
