"""PaliGemma (1 and 2; a Gemma 3 text model works too) from vlmkern pieces: the SigLIP tower
(:mod:`vlmkern.models.vision_transformer`), vlmkern's PaliGemma projector and HF's Gemma
language model, with PaliGemma's prefix-LM attention (the image and prompt see each other; the
answer is causal) and its 1-based positions, built from a ``transformers``
``PaliGemmaForConditionalGeneration``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..nn.projector import PaliGemmaMultiModalProjector
from ._common import copy_of, hf_parts, pixel_dtype
from .vision_transformer import SiglipVisionTransformer
from .vlm import VisionLanguageModel, text_positions


class PaliGemma(VisionLanguageModel):
    """``lm_head(Gemma(embeds with projector(tower(pixels)) in the image tokens))``: each image
    ``(C, H, W)`` gives ``(H/P)(W/P)`` features (SigLIP's ``last_hidden_state``, no pooling)
    for as many ``image_token_id`` placeholders.

    ``forward(input_ids, pixel_values=None, token_type_ids=None, ...)``: ``token_type_ids``
    (B, S), 0 for the prefix (image and prompt, attending to each other both ways) and 1 for
    the suffix (causal), as the processor gives them. Without them the mask is HF's, which
    depends on the attention implementation: PaliGemma's Gemma is bidirectional, so an unpadded
    prompt under SDPA gets no mask at all (every token sees every other), a padded one or eager
    attention a causal mask. The prefix pattern applies to the prompt's forward (no cache
    yet); decode steps are causal over the cache, as in HF's ``generate``. Images after the
    first turn (pixels with a non-empty cache) raise: HF's mask for them is shifted by the
    cache length. Positions are 1-based, as HF's."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, language_model: nn.Module,
                 lm_head: nn.Module, *, image_token_id: int, text_config: Any) -> None:
        super().__init__(language_model, lm_head)
        self.vision_tower, self.multi_modal_projector = vision_tower, projector
        self.image_token_id, self.text_config = image_token_id, text_config

    @classmethod
    def from_hf(cls, model: nn.Module, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, rescale: float = 1.0) -> PaliGemma:
        """From a ``PaliGemmaForConditionalGeneration``: vlmkern's tower and projector hold
        copies of HF's weights; the language model and LM head are HF's modules (shared).
        ``mean`` / ``std`` / ``rescale``: the image processor's normalization, folded into the
        patch embedding (raw uint8 pixels then); without them, normalized floats as HF."""
        config, inner = hf_parts("PaliGemma", model)
        if config.model_type != "paligemma":
            raise NotImplementedError(f"vlmkern.models.PaliGemma: only PaliGemma models "
                                      f"(model_type 'paligemma'), got {config.model_type!r}")
        hf_proj = inner.multi_modal_projector
        projector = copy_of(lambda: PaliGemmaMultiModalProjector(
            hf_proj.linear.in_features, hf_proj.linear.out_features), hf_proj)
        tower = SiglipVisionTransformer.from_hf(inner.vision_tower, mean=mean, std=std,
                                                rescale=rescale)
        return cls(tower, projector, inner.language_model, model.lm_head,
                   image_token_id=config.image_token_id, text_config=config.get_text_config())

    def vision_features(self, pixel_values: torch.Tensor | None = None,
                        token_type_ids: torch.Tensor | None = None,
                        **unused: Any) -> dict[int, torch.Tensor]:
        """pixel_values (N, C, H, W) float (cast to the tower's dtype) or uint8 (given the
        normalization at construction) -> {image_token_id: (N · T, D)}, the images in order
        (one per row as the processor gives them, or several)."""
        if unused:
            raise TypeError(f"vlmkern.models.PaliGemma: unexpected inputs {sorted(unused)}")
        if pixel_values is None:
            return {}
        if pixel_values.is_floating_point():
            pixel_values = pixel_values.to(pixel_dtype(self.vision_tower))
        h = self.vision_tower(pixel_values)  # (B, T, C_v)
        return {self.image_token_id: self.multi_modal_projector(h).flatten(0, 1)}

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Gemma's embeddings, an image token id outside its vocabulary embedded as token 0
        (its rows are replaced by the features anyway; HF's rule)."""
        table = self.language_model.get_input_embeddings()
        if self.image_token_id >= table.num_embeddings:
            input_ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return table(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head``, then Gemma 2's ``final_logit_softcapping`` c where the text config has
        it: ``c · tanh(logits / c)``, as HF."""
        logits = self.lm_head(hidden)
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int,
                  rope_deltas: torch.Tensor | None, vision_inputs: dict[str, Any],
                  ) -> tuple[torch.Tensor, None]:
        """1-based text positions (B, S) (left padding skipped)."""
        b, s = input_ids.shape
        return text_positions(attention_mask, b, s, past, input_ids.device) + 1, None

    def language_mask(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                      past_key_values: Any, position_ids: torch.Tensor,
                      vision_inputs: dict[str, Any]) -> Any:
        """transformers' masks for the Gemma model (its attention implementation's kind: a
        boolean or additive 4D tensor, a BlockMask, or None where none is needed): causal over
        the cache and the padding, the prefix (``token_type_ids`` == 0) bidirectional on the
        prompt's forward; with a sliding window (PaliGemma 2's Gemma 2) also the sliding one."""
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        types = vision_inputs.get("token_type_ids")
        cached = past_key_values is not None and past_key_values.is_initialized
        if cached and vision_inputs.get("pixel_values") is not None:
            raise NotImplementedError("vlmkern.models.PaliGemma: images after the first turn "
                                      "(pixel_values with a non-empty cache) are not supported")
        kwargs = dict(config=self.text_config, inputs_embeds=embeds,
                      attention_mask=attention_mask, past_key_values=past_key_values,
                      position_ids=position_ids)
        if types is not None and not cached:
            kwargs["block_sequence_ids"] = torch.where(types == 0, 0, -1)  # (B, S)
        mask = create_causal_mask(**kwargs)
        if getattr(self.text_config, "sliding_window", None) is None:
            return mask
        return {"full_attention": mask,
                "sliding_attention": create_sliding_window_causal_mask(**kwargs)}

