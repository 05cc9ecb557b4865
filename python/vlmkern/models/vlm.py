"""Complete VLMs: a vlmkern vision tower and connector in front of a decoder LLM (any module that
takes ``inputs_embeds``, e.g. HF's, kept as it is). Image features go into the image tokens'
embedding rows, Qwen's M-RoPE positions come from one device op; logits out, and a greedy
``generate`` loop over the LLM's KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class VLMOutput:
    """``logits`` (B, S_kept, vocab) in the LM head's dtype; ``past_key_values``: the LLM's cache
    (None unless ``use_cache``); ``rope_deltas`` (3, B, 1) int64 for M-RoPE models (pass it back
    at decode steps), else None."""

    logits: torch.Tensor
    past_key_values: Any = None
    rope_deltas: torch.Tensor | None = None


def scatter_features(embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int,
                     features: torch.Tensor, used: torch.Tensor | None = None,
                     what: str | None = None) -> torch.Tensor:
    """``embeds`` (B, S, D) with the rows where ``input_ids`` (B, S) == ``token_id`` replaced, in
    order, by the rows of ``features`` (n, D), as HF's ``masked_scatter``. ``used``: a 0-d
    device tensor, the number of leading rows meant (all n by default; the rest are spare),
    described by ``what`` in the error. The count check runs on the device
    (``torch._assert_async``): no host sync, so the caller stays capturable."""
    mask = input_ids == token_id  # (B, S) bool
    used = features.shape[0] if used is None else used
    what = what or f"the number of feature rows ({features.shape[0]})"
    torch._assert_async(mask.sum() == used,
                        f"vlmkern.models: the number of token id {token_id} placeholders in "
                        f"input_ids must equal {what}")
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))


def text_positions(attention_mask: torch.Tensor | None, batch: int, seq: int, past: int,
                   device: torch.device) -> torch.Tensor:
    """(B, S) int64 positions of the newest ``seq`` tokens: the count of real tokens before each
    (left padding skipped, padding rows at 0), or ``past + arange(seq)`` without a mask."""
    if attention_mask is None:
        return (torch.arange(seq, device=device) + past).expand(batch, seq)
    pos = attention_mask.long().cumsum(-1) - 1  # (B, past + S)
    return pos.clamp_min(0)[:, -seq:]


class VisionLanguageModel(nn.Module):
    """vision → connector → LLM. Subclasses say how pixels become features for which token id
    (:meth:`vision_features`) and how positions are counted (:meth:`positions`).

    ``language_model``: a decoder taking ``inputs_embeds``, ``attention_mask``, ``position_ids``,
    ``past_key_values``, ``use_cache`` and returning an object with ``last_hidden_state`` and
    ``past_key_values`` (HF's ``*TextModel`` / ``LlamaModel``), with ``get_input_embeddings()``;
    ``lm_head``: hidden → vocab."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head

    def vision_features(self, **vision_inputs: Any) -> dict[int, torch.Tensor]:
        """token id → (n, D) features for that token's placeholders, in order; {} for none."""
        raise NotImplementedError

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S, D) the LLM's token embeddings of ``input_ids`` (placeholders included)."""
        return self.language_model.get_input_embeddings()(input_ids)

    def embed(self, input_ids: torch.Tensor, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """(B, S, D) token embeddings, each placeholder row replaced by its feature row."""
        embeds = self.embed_tokens(input_ids)  # (B, S, D)
        for token_id, feats in features.items():
            embeds = scatter_features(embeds, input_ids, token_id, feats)
        return embeds

    def language_inputs(self, input_ids: torch.Tensor, **vision_inputs: Any
                        ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(the LLM's ``inputs_embeds`` (B, S, D), extra keyword arguments for the LLM: none
        here)."""
        return self.embed(input_ids, self.vision_features(**vision_inputs)), {}

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int,
                  rope_deltas: torch.Tensor | None, vision_inputs: dict[str, Any],
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(position_ids for the LLM, rope_deltas or None). Default: 1-D text positions."""
        b, s = input_ids.shape
        return text_positions(attention_mask, b, s, past, input_ids.device), None

    def language_mask(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                      past_key_values: Any, position_ids: torch.Tensor,
                      vision_inputs: dict[str, Any]) -> Any:
        """What the LLM gets as ``attention_mask``: the (B, past + S) padding mask itself here
        (the LLM makes its causal mask); subclasses with other attention patterns (PaliGemma's
        bidirectional prefix) build the LLM's mask from it."""
        return attention_mask

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, S, vocab) logits of the LLM's last hidden states (B, S, D): ``lm_head``."""
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                past_key_values: Any = None, use_cache: bool = False,
                rope_deltas: torch.Tensor | None = None, logits_to_keep: int = 0,
                **vision_inputs: Any) -> VLMOutput:
        """``input_ids`` (B, S) int64 with one placeholder token per feature row;
        ``attention_mask`` (B, past + S) 1 = real token (left padding for generation);
        ``vision_inputs``: the subclass's pixel arguments (None or absent at decode steps);
        ``logits_to_keep``: 0 = every position, n = the last n."""
        embeds, extra = self.language_inputs(input_ids, **vision_inputs)
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        position_ids, rope_deltas = self.positions(input_ids, attention_mask, past, rope_deltas,
                                                   vision_inputs)
        mask = self.language_mask(embeds, attention_mask, past_key_values, position_ids,
                                  vision_inputs)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask,
                                  position_ids=position_ids, past_key_values=past_key_values,
                                  use_cache=use_cache, **extra)
        hidden = out.last_hidden_state  # (B, S, D)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return VLMOutput(self.logits(hidden), out.past_key_values if use_cache else None,
                         rope_deltas)

    def decode_inputs(self, vision_inputs: dict[str, Any]) -> dict[str, Any]:
        """What :meth:`generate` passes at decode steps of the prompt's vision inputs: nothing
        here (the images are in the prompt's embeddings and cache)."""
        return {}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, output_logits: bool = False,
                 **vision_inputs: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding over the LLM's KV cache (transformers' ``DynamicCache``): returns
        (B, S + new) int64, prompt first, and with ``output_logits`` also each step's logits
        (B, new, vocab). Batches are left-padded (``attention_mask``). A row that produced one
        of ``eos_token_id`` continues with ``pad_token_id``, or without one with the first eos
        id (HF's generate does the same, with a warning); the loop reads the tokens on the host
        only to stop once every row has finished."""
        from transformers import DynamicCache

        if max_new_tokens < 1:
            raise ValueError(f"vlmkern.models generate: max_new_tokens must be >= 1, got "
                             f"{max_new_tokens}")
        eos_ids = ([] if eos_token_id is None else
                   [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        eos = torch.tensor(eos_ids, device=input_ids.device) if eos_ids else None
        fill = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else None)
        # with the LLM's config, as HF's generate: sliding-window layers keep their window only
        cache = DynamicCache(config=getattr(self.language_model, "config", None))
        deltas, mask, step = None, attention_mask, input_ids
        later = self.decode_inputs(vision_inputs)
        tokens, logits = [], []
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            out = self(step, attention_mask=mask, past_key_values=cache, use_cache=True,
                       rope_deltas=deltas, logits_to_keep=1, **vision_inputs)
            cache, deltas, vision_inputs = out.past_key_values, out.rope_deltas, later
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1].argmax(-1)  # (B,)
            if eos is not None:
                nxt = nxt.masked_fill(done, fill)
                done = done | torch.isin(nxt, eos)
            tokens.append(nxt)
            step = nxt[:, None]
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], -1)
            if eos is not None and bool(done.all()):
                break
        ids = torch.cat([input_ids, torch.stack(tokens, 1)], 1)
        return (ids, torch.stack(logits, 1)) if output_logits else ids
