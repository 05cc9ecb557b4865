"""CLIP and SigLIP vision towers from vlmkern pieces (fused patch embedding, cross_attention, the
LayerNorm-prologue mlp_projector), loading HF ``CLIPVisionModel`` / ``SiglipVisionModel`` state
dicts unchanged and equal to their outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.patch_embed import CLIPVisionEmbeddings, SiglipVisionEmbeddings
from ..nn.projector import activation_from_hf
from ..ops.cross_attention import CUDA_DTYPES, CUDA_HEAD_DIMS, cross_attention
from ._common import check_pixels, copy_of, layers_to_run, residual_norm_mlp

# On the CPU attention runs torch SDPA: on 2 cores it took 0.78-1.08x the op's time in forward
# (two runs; above 1 once, ViT-B bf16) and 0.75-0.95x in forward + backward, fp32 and bf16, at
# CLIP-L/14-336 (16 heads, 577 tokens, head dim 64), SigLIP-so400m (16 x 729 x 72) and ViT-B
# (4 x 12 x 197 x 64). Tests set this to cover the op's CPU path.
CPU_KERNEL = False


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Non-causal, unmasked ``softmax(scale · q kᵀ) v``. q ``(B, H, Sq, hd)``, k, v ``(B, H, Sk,
    hd)`` (any strides, float) -> ``(B, H, Sq, hd)`` in q's dtype. vlmkern.ops.cross_attention on
    CUDA where its kernels take the dtype (fp16 / bf16) and head dim; torch SDPA elsewhere, on the
    CPU (see CPU_KERNEL) and with attention dropout (the op has none)."""
    kernel = (q.dtype in CUDA_DTYPES and q.shape[-1] in CUDA_HEAD_DIMS) if q.is_cuda else CPU_KERNEL
    if kernel and dropout_p == 0.0:
        return cross_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def head_dim_of(dim: int, num_heads: int) -> int:
    """The head dim of ``num_heads`` heads over ``dim`` channels; a dim they do not divide
    raises ValueError."""
    if dim % num_heads:
        raise ValueError(f"vlmkern.models: hidden_size {dim} is not divisible by "
                         f"num_attention_heads {num_heads}")
    return dim // num_heads


class ViTSelfAttention(nn.Module):
    """HF ``CLIPAttention`` / ``SiglipAttention`` (``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``): ``(B, S, D) -> (B, S, D)``, scale ``head_dim ** -0.5``, no mask."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        dim, self.num_heads = config.hidden_size, config.num_attention_heads
        self.head_dim = head_dim_of(dim, self.num_heads)
        self.scale = self.head_dim**-0.5
        self.dropout = float(getattr(config, "attention_dropout", 0.0))
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        q, k, v = (p(hidden_states).view(b, s, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = attend(q, k, v, self.scale, self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, -1))


class ViTMLP(nn.Module):
    """HF ``CLIPMLP`` / ``SiglipMLP`` (``fc1``, ``fc2``, ``config.hidden_act``) with its pre-norm
    and residual: ``forward(x (..., D), norm) = x + fc2(act(fc1(norm(x))))``, one mlp_projector
    call with the LayerNorm as its prologue. Activations: those of
    :func:`vlmkern.nn.projector.activation_from_hf` (others raise ValueError here)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.activation = activation_from_hf(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return residual_norm_mlp(x, norm, self.fc1, self.fc2, self.activation)


class ViTEncoderLayer(nn.Module):
    """HF ``CLIPEncoderLayer`` / ``SiglipEncoderLayer``: ``x + attn(ln1(x))``, then
    ``x + mlp(ln2(x))``. ``(B, S, D) -> (B, S, D)``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = ViTSelfAttention(config)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ViTMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states))
        return self.mlp(hidden_states, self.layer_norm2)


class ViTEncoder(nn.Module):
    """HF ``CLIPEncoder`` / ``SiglipEncoder``'s ``layers``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ViTEncoderLayer(config)
                                    for _ in range(config.num_hidden_layers))


class _VisionTransformer(nn.Module):
    """What CLIP's and SigLIP's towers share: embeddings, encoder layers, ``post_layernorm``."""

    _embeddings: type[nn.Module]
    _pre_layernorm = False  # CLIP's pre_layrnorm (HF's spelling) after the embeddings

    def __init__(self, config: Any, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, rescale: float = 1.0) -> None:
        super().__init__()
        self.config = config
        self.num_channels = config.num_channels
        self.embeddings = self._embeddings(config, mean=mean, std=std, rescale=rescale)
        if self._pre_layernorm:
            self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = ViTEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @classmethod
    def from_hf(cls, model: nn.Module, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, rescale: float = 1.0) -> _VisionTransformer:
        """A copy of HF's tower (``*VisionModel``, or a model holding one as ``.vision_model``:
        ``*VisionModelWithProjection``, ``CLIPModel`` / ``SiglipModel``), built on the device and
        in the dtype of its patch-embedding weight, in its train / eval mode. ``mean`` / ``std`` /
        ``rescale``: the processor's normalization, folded into the patch embedding for uint8
        pixels (see :class:`vlmkern.nn.CLIPVisionEmbeddings`)."""
        model = getattr(model, "vision_model", model)
        return copy_of(lambda: cls(model.config, mean=mean, std=std, rescale=rescale), model)

    def _embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        """HF's ``hidden_states[0]``."""
        check_pixels(type(self).__name__, pixel_values, self.num_channels, self.embeddings)
        return self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)

    def _final(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """HF's ``last_hidden_state`` from the last layer's output."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor, *, feature_layer: int | None = None,
                interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """pixel_values ``(B, C, H, W)``, float (cast to the weights' dtype, as HF) or uint8 (with
        the ``mean`` / ``std`` / ``rescale`` given at construction) -> ``(B, S, D)`` in the
        weights' dtype: HF's ``last_hidden_state`` with ``feature_layer=None``, else HF's
        ``hidden_states[feature_layer]`` (0 the embeddings, i layer i's output, negative from
        the end as LLaVA's -2), without running the layers after it.
        ``interpolate_pos_encoding``: bicubic-resize the positions to another image size."""
        if feature_layer is not None:
            return self.hidden_states(pixel_values, [feature_layer],
                                      interpolate_pos_encoding=interpolate_pos_encoding)[0]
        hidden_states = self._embed(pixel_values, interpolate_pos_encoding)
        for layer in self.encoder.layers:
            hidden_states = layer(hidden_states)
        return self._final(hidden_states)

    def hidden_states(self, pixel_values: torch.Tensor, layers: Sequence[int], *,
                      interpolate_pos_encoding: bool = False) -> list[torch.Tensor]:
        """HF's ``hidden_states[i]`` ``(B, S, D)`` for each ``i`` of ``layers`` (as
        :meth:`forward`'s ``feature_layer``), in that order; the layers after the deepest one
        asked for are not run, and only the states asked for are kept."""
        name, n = type(self).__name__, len(self.encoder.layers)
        stops = [layers_to_run(name, n, i) for i in layers]
        hidden_states = self._embed(pixel_values, interpolate_pos_encoding)
        kept = {0: hidden_states} if 0 in stops else {}
        for i, layer in enumerate(self.encoder.layers[:max(stops, default=0)], 1):
            hidden_states = layer(hidden_states)
            if i in stops:
                kept[i] = hidden_states
        return [kept[s] for s in stops]

    def pool(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """HF's ``pooler_output`` ``(B, D)`` from :meth:`forward`'s ``(B, S, D)`` output."""
        raise NotImplementedError

    def pooled(self, pixel_values: torch.Tensor, *,
               interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """HF's ``pooler_output`` ``(B, D)``: ``pool(forward(pixel_values))``."""
        return self.pool(self(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding))


class CLIPVisionTransformer(_VisionTransformer):
    """HF ``CLIPVisionModel`` (the tower of CLIP, LLaVA): embeddings (CLS first) ->
    ``pre_layrnorm`` -> layers. Its ``last_hidden_state`` (``forward``'s default) is the last
    layer's output, *not* post-normed; ``pool`` is ``post_layernorm`` of the CLS row, as HF.
    Quick-GELU MLPs (``config.hidden_act``)."""

    _embeddings = CLIPVisionEmbeddings
    _pre_layernorm = True

    def _embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        return self.pre_layrnorm(super()._embed(pixel_values, interpolate_pos_encoding))

    def _final(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def pool(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(last_hidden_state[:, 0])


class SiglipAttentionPoolingHead(nn.Module):
    """HF ``SiglipMultiheadAttentionPoolingHead`` (``probe``, ``attention`` an
    nn.MultiheadAttention holding its weights, ``layernorm``, ``mlp``): the probe attends over
    the tokens (by :func:`attend`), then ``x + mlp(layernorm(x))``. ``(B, S, D) -> (B, D)``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        dim, self.num_heads = config.hidden_size, config.num_attention_heads
        self.probe = nn.Parameter(torch.randn(1, 1, dim))
        self.attention = nn.MultiheadAttention(dim, self.num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = ViTMLP(config)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        attn, (b, s, d), h = self.attention, hidden_state.shape, self.num_heads
        w_q, w_kv = attn.in_proj_weight.split([d, 2 * d])
        b_q, b_kv = attn.in_proj_bias.split([d, 2 * d])
        q = F.linear(self.probe, w_q, b_q).view(1, 1, h, -1).transpose(1, 2).expand(b, -1, -1, -1)
        kv = F.linear(hidden_state, w_kv, b_kv).view(b, s, 2, h, -1)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, hd) views
        out = attend(q, k, v, (d // h) ** -0.5, attn.dropout if self.training else 0.0)
        x = attn.out_proj(out.transpose(1, 2).reshape(b, 1, d))
        return self.mlp(x, self.layernorm)[:, 0]


class SiglipVisionTransformer(_VisionTransformer):
    """HF ``SiglipVisionModel`` (the tower of SigLIP, PaliGemma, Idefics-style models):
    embeddings (no CLS) -> layers -> ``post_layernorm`` (its ``last_hidden_state``, ``forward``'s
    default); ``pool`` is the attention-pooling ``head`` when ``config.vision_use_head`` (else
    HF's ``pooler_output`` is None and ``pool`` raises). Tanh-GELU MLPs (``config.hidden_act``)."""

    _embeddings = SiglipVisionEmbeddings

    def __init__(self, config: Any, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, rescale: float = 1.0) -> None:
        super().__init__(config, mean=mean, std=std, rescale=rescale)
        self.use_head = bool(getattr(config, "vision_use_head", True))
        if self.use_head:
            self.head = SiglipAttentionPoolingHead(config)

    def _final(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(hidden_states)

    def pool(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        if not self.use_head:
            raise ValueError("vlmkern.models.SiglipVisionTransformer: no pooling head "
                             "(config.vision_use_head is False; HF's pooler_output is None)")
        return self.head(last_hidden_state)
