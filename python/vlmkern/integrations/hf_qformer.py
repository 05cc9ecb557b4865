"""The Q-Former attention of BLIP-2 / InstructBLIP(-Video) with HF's call signature, over
:class:`vlmkern.nn.Blip2QFormerMultiHeadAttention`: the learned queries' cross-attention to the
image (and the self-attention) as one vlmkern cross_attention where no mask or dropout is asked
for; HF's own attention function otherwise, so results stay HF's."""

from __future__ import annotations

from typing import Any

import torch

from .. import nn as vnn
from ..ops.cross_attention import CUDA_DTYPES, CUDA_HEAD_DIMS


class HFQFormerMultiHeadAttention(vnn.Blip2QFormerMultiHeadAttention):
    """Drop-in for HF's ``Blip2QFormerMultiHeadAttention`` (and InstructBLIP's): the same
    parameters (``query``, ``key``, ``value``), ``forward`` arguments and ``(output,
    weights)`` result (weights None but under eager attention).

    The vlmkern kernel runs when there is no mask (HF drops an all-ones one: BLIP-2's image
    mask, InstructBLIP's queries without text), no attention dropout (eval mode, or a dropout
    probability of 0) and, on CUDA, bf16 / fp16 at a head dim the kernels take. A padding mask
    (instruction text), training-time dropout or fp32 on CUDA (BLIP-2 keeps its Q-Former in
    fp32) go to HF's attention function for the model's ``attn_implementation``, called as HF
    calls it; so does eager attention chosen after the patch (its weights are recorded). Under
    ``torch.compile`` HF keeps BLIP-2's all-ones image mask, so its cross-attention takes HF's
    path there."""

    def __init__(self, config: Any, is_cross_attention: bool = False) -> None:
        super().__init__(config, is_cross_attention)
        self.config = config
        self.is_causal = False  # read by HF's attention functions
        self.attention_dropout = config.attention_probs_dropout_prob

    def forward(self, hidden_states: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        cross = encoder_hidden_states is not None
        mask = encoder_attention_mask if cross else attention_mask
        dropout = self.attention_dropout if self.training else 0.0
        kernel = not hidden_states.is_cuda or (hidden_states.dtype in CUDA_DTYPES
                                              and self.attention_head_size in CUDA_HEAD_DIMS)
        eager = self.config._attn_implementation == "eager"  # set after the patch: weights
        if mask is None and dropout == 0.0 and kernel and not eager:
            return super().forward(hidden_states, encoder_hidden_states), None
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.blip_2.modeling_blip_2 import eager_attention_forward

        states = encoder_hidden_states if cross else hidden_states
        q = self.query(hidden_states).unflatten(-1, (-1, self.attention_head_size))
        k = self.key(states).unflatten(-1, (-1, self.attention_head_size))
        v = self.value(states).unflatten(-1, (-1, self.attention_head_size))
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                       eager_attention_forward)
        out, weights = attend(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              mask, dropout=dropout, scaling=self.scaling, **kwargs)
        return out.reshape(*out.shape[:2], -1), weights
