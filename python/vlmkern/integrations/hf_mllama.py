"""Mllama's gated cross-attention decoder layer with HF's call signature, over
:class:`vlmkern.nn.MllamaCrossAttentionDecoderLayer`: HF's dense additive mask is read back as
visible key ranges (one entry per tile, no host sync), HF's KV cache is used as HF uses it."""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from .. import nn as vnn
from ..ops.cross_attention import mllama_kv_ranges


class HFMllamaCrossAttentionDecoderLayer(GradientCheckpointingLayer,
                                         vnn.MllamaCrossAttentionDecoderLayer):
    """Drop-in for HF's ``MllamaCrossAttentionDecoderLayer`` (same parameters, same
    ``forward`` arguments and result, gradient checkpointing as HF's layer).

    ``cross_attention_mask`` is HF's ``(B, 1, S, L)`` additive mask built by
    ``_prepare_cross_attention_mask`` from the processor's tile mask: constant over each tile's
    ``num_vision_tokens`` keys, 0 where visible, and all 0 on rows that see no image (HF then
    attends to every key there and zeroes the MLP branch by ``full_text_row_masked_out_mask``).
    Its first key per tile gives the tile mask back, hence the visible key ranges.
    """

    def __init__(self, config: Any, layer_idx: int, num_vision_tokens: int) -> None:
        super().__init__(config, layer_idx, masked_rows="uniform")
        self.num_vision_tokens = int(num_vision_tokens)

    def forward(self, hidden_states: torch.Tensor,
                cross_attention_states: torch.Tensor | None = None,
                cross_attention_mask: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                full_text_row_masked_out_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                past_key_values: Any = None, use_cache: bool | None = False,
                position_embeddings: Any = None, **kwargs: Any) -> torch.Tensor:
        kv = self._keys_values(hidden_states.shape[0], cross_attention_states, past_key_values)
        ranges = None if cross_attention_mask is None else \
            self._ranges(cross_attention_mask, kv[0].shape[2])
        row = None if full_text_row_masked_out_mask is None else full_text_row_masked_out_mask[:, 0]
        return self._layer(hidden_states, None, kv, ranges, row)

    def _keys_values(self, batch: int, states: torch.Tensor | None,
                     cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Hk, L, D) keys and values: projected from the image states (and cached, as HF
        does), or HF's cached ones when no image states come. MllamaModel passes the states as
        (B · images · tiles, tokens, hidden); HF's attention views them per text row, as here."""
        if states is not None:
            states = states.reshape(batch, -1, states.shape[-1])
            k, v = self.cross_attn.project_kv(states)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            return k, v
        if cache is None:
            raise ValueError("vlmkern: MllamaCrossAttentionDecoderLayer needs "
                             "cross_attention_states or a cache holding this layer's image keys")
        layer = cache.layers[self.layer_idx]
        return layer.keys, layer.values

    def _ranges(self, mask: torch.Tensor, keys: int) -> torch.Tensor:
        n = self.num_vision_tokens
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != keys or keys % n:
            raise ValueError(
                f"vlmkern: MllamaCrossAttentionDecoderLayer expects HF's (B, 1, S, {keys}) "
                f"cross-attention mask over tiles of {n} keys, got {tuple(mask.shape)}")
        tiles = mask[:, 0, :, ::n] == 0  # (B, S, tiles): a tile is visible where HF adds 0
        return mllama_kv_ranges(tiles.unsqueeze(2), n)
