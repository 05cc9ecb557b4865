"""Llama-3.2-Vision (Mllama) from vlmkern pieces: the tiled vision tower (fused patch embedding,
masked attention by vlmkern.ops.cross_attention on CUDA, gated global layers), the projector, and
HF's ``MllamaTextModel`` fed the image states and HF's cross-attention masks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.cross_attention import _gated_residual
from ..nn.patch_embed import _check_fusable, _Normalizing, _run_hooks
from ..ops.cross_attention import CUDA_DTYPES, CUDA_HEAD_DIMS, cross_attention
from ..ops.patch_embed import patch_embed
from . import vision_transformer as _vt
from ._common import check_pixels, copy_of, hf_parts, norm_mlp
from .vision_transformer import ViTMLP
from .vlm import VisionLanguageModel, VLMOutput

_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


class _TileEmbedding(nn.Module):
    """HF ``MllamaPrecomputedAspectRatioEmbedding`` (gated): one ``(tiles, D)`` row block per
    aspect-ratio id, scaled by ``tanh(gate)``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.max_num_tiles, self.hidden_size = config.max_num_tiles, config.hidden_size
        self.embedding = nn.Embedding(config.max_aspect_ratio_id + 1,
                                      self.max_num_tiles * self.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """(N,) ids -> (N, tiles, 1, D) gated rows, to add to every token of each tile."""
        rows = self.embedding(aspect_ratio_ids).view(-1, self.max_num_tiles, 1, self.hidden_size)
        return rows * self.gate.tanh()


class _PositionEmbedding(nn.Module):
    """HF ``MllamaPrecomputedPositionEmbedding``'s parameters: ``(1 - tanh(gate)) · embedding``
    (CLS + patches) for every tile plus ``tanh(gate) ·`` the aspect ratio's tile table."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.num_patches = (config.image_size // config.patch_size) ** 2 + 1
        dim = config.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(dim**-0.5 * torch.randn(self.num_patches, dim))
        self.tile_embedding = nn.Embedding(config.max_aspect_ratio_id + 1,
                                           config.max_num_tiles * self.num_patches * dim)


class _Attention(nn.Module):
    """HF ``MllamaVisionAttention`` (no biases): ``attend`` gives the heads' output before
    ``o_proj``, under the tower's key mask."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        dim, self.num_heads = config.hidden_size, config.attention_heads
        self.head_dim = dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(dim, dim, bias=False) for _ in range(4))

    def attend(self, x: torch.Tensor, mask: dict[str, torch.Tensor]) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if "kv_ranges" in mask:  # rows that see nothing give 0 here, HF's mean below
            out = cross_attention(q, k, v, scale=self.scale, kv_ranges=mask["kv_ranges"])
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask["allowed"],
                                                 scale=self.scale)
        dead = mask["dead"][:, None, :, None]  # (N, 1, L, 1)
        out = torch.where(dead, v.mean(2, keepdim=True).to(out.dtype), out)
        return out.transpose(1, 2).reshape(b, s, -1)


class MllamaVisionEncoderLayer(nn.Module):
    """HF ``MllamaVisionEncoderLayer``: ``x + g_a · o_proj(attn(ln1(x)))``, then
    ``x + g_f · mlp(ln2(x))``, with ``g = tanh(gate)`` in the gated (global) layers, 1 else.
    The MLP is one mlp_projector call (LayerNorm prologue); the gated o_proj one gated_linear."""

    def __init__(self, config: Any, is_gated: bool = False) -> None:
        super().__init__()
        self.is_gated = is_gated
        self.self_attn = _Attention(config)
        self.mlp = ViTMLP(config)  # fc1, fc2, hidden_act: its residual forward is not used
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        if is_gated:
            self.gate_attn = nn.Parameter(torch.ones(1) * math.pi / 4)
            self.gate_ffn = nn.Parameter(torch.ones(1) * math.pi / 4)

    def forward(self, x: torch.Tensor, mask: dict[str, torch.Tensor]) -> torch.Tensor:
        attn, mlp = self.self_attn, self.mlp
        h = attn.attend(self.input_layernorm(x), mask)
        x = _gated_residual(attn.o_proj, h, self.gate_attn, x) if self.is_gated else \
            x + attn.o_proj(h)
        m = norm_mlp(x, self.post_attention_layernorm, mlp.fc1, mlp.fc2, mlp.activation)
        return x + self.gate_ffn.tanh() * m if self.is_gated else x + m


class _Encoder(nn.Module):
    """HF ``MllamaVisionEncoder``'s ``layers``."""

    def __init__(self, config: Any, layers: int, is_gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionEncoderLayer(config, is_gated)
                                    for _ in range(layers))


class MllamaVisionTransformer(_Normalizing):
    """HF ``MllamaVisionModel`` (same state dict): per tile a Conv2d (no bias) + CLS, gated
    pre-tile, position and tile-position embeddings (by aspect-ratio id), ``layernorm_pre``,
    tokens padded to a multiple of 8 per tile, the local layers over all tiles of an image,
    ``layernorm_post``, gated post-tile embedding, the gated global layers; the output is the
    global output, padding removed, concatenated with the local layers'
    ``intermediate_layers_indices`` outputs (interleaved as HF's stack + reshape).

    ``forward(pixel_values (B, M, tiles, C, H, W), aspect_ratio_ids (B, M) int,
    aspect_ratio_mask (B, M, tiles) 0/1)`` -> ``(B, M, tiles, 1 + (H/P)·(W/P), vision_output_dim)``
    in the weights' dtype; ``tiles`` must be ``max_num_tiles`` and ``H = W = image_size`` (as
    HF's broadcasts require). Float pixels are cast to the weights' dtype; uint8 ones need
    ``mean`` / ``std`` / ``rescale`` (folded into the patch GEMM).

    Attention mask, as HF's ``_prepare_aspect_ratio_attention_mask``: a token is *padding* when
    its tile is masked out or it is one of the pad-to-8 tokens; key ``j`` is hidden from query
    ``i`` only when both are padding (real tokens see every key); a padding row with no real key
    (an image whose tiles are all masked; HF's processor always keeps tile 0) gets the mean of
    the values, which HF's all-``min`` row gives in fp32; no gradient reaches q and k from such
    rows (HF's eager and SDPA paths differ 360x there: rounding of ``min``). On CUDA with a
    kernel dtype / head dim the mask runs as visible key ranges in
    vlmkern.ops.cross_attention (``vision_transformer.CPU_KERNEL`` selects it on the CPU);
    elsewhere SDPA with a boolean mask. Nothing is read back on the host."""

    def __init__(self, config: Any, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, rescale: float = 1.0) -> None:
        super().__init__(mean, std, rescale)
        self.config = config
        self.image_size, self.patch_size = config.image_size, config.patch_size
        self.max_num_tiles, self.hidden_size = config.max_num_tiles, config.hidden_size
        self.num_channels = config.num_channels
        self.intermediate_layers_indices = list(config.intermediate_layers_indices)
        layers = config.num_hidden_layers
        if not all(-layers <= i < layers for i in self.intermediate_layers_indices):
            raise ValueError(f"vlmkern.models.MllamaVisionTransformer: "
                             f"intermediate_layers_indices {self.intermediate_layers_indices} "
                             f"must index the {layers} local layers")
        self.num_patches = (self.image_size // self.patch_size) ** 2 + 1
        dim = config.hidden_size
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, kernel_size=self.patch_size,
                                         stride=self.patch_size, padding="valid", bias=False)
        self.class_embedding = nn.Parameter(dim**-0.5 * torch.randn(dim))
        self.gated_positional_embedding = _PositionEmbedding(config)
        self.pre_tile_positional_embedding = _TileEmbedding(config)
        self.post_tile_positional_embedding = _TileEmbedding(config)
        self.layernorm_pre = nn.LayerNorm(dim)
        self.layernorm_post = nn.LayerNorm(dim)
        self.transformer = _Encoder(config, config.num_hidden_layers, is_gated=False)
        self.global_transformer = _Encoder(config, config.num_global_layers, is_gated=True)

    @classmethod
    def from_hf(cls, model: nn.Module, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None,
                rescale: float = 1.0) -> MllamaVisionTransformer:
        """A copy of HF's ``MllamaVisionModel`` (or of a model's ``.vision_model``) on its device
        and dtype, in its train / eval mode."""
        model = getattr(model, "vision_model", model)
        if type(model).__name__ != "MllamaVisionModel":
            raise NotImplementedError(f"vlmkern.models.MllamaVisionTransformer: HF's "
                                      f"{type(model).__name__} is not MllamaVisionModel")
        return copy_of(lambda: cls(model.config, mean=mean, std=std, rescale=rescale), model)

    def _check(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
               aspect_ratio_mask: torch.Tensor) -> None:
        name, t, c, s = (type(self).__name__, self.max_num_tiles, self.num_channels,
                         self.image_size)
        if pixel_values.dim() != 6 or pixel_values.shape[2:] != (t, c, s, s):
            raise ValueError(f"vlmkern.models.{name}: pixel_values must be (B, images, {t}, {c}, "
                             f"{s}, {s}) (max_num_tiles tiles of image_size), got shape "
                             f"{tuple(pixel_values.shape)}")
        check_pixels(name, pixel_values[0, 0], c, self)
        images = tuple(pixel_values.shape[:2])
        if aspect_ratio_ids is None or tuple(aspect_ratio_ids.shape) != images \
                or aspect_ratio_ids.is_floating_point():
            got = None if aspect_ratio_ids is None else tuple(aspect_ratio_ids.shape)
            raise ValueError(f"vlmkern.models.{name}: aspect_ratio_ids must be an int tensor "
                             f"{images} (B, images), got {got}")
        if aspect_ratio_mask is None or tuple(aspect_ratio_mask.shape) != images + (t,):
            got = None if aspect_ratio_mask is None else tuple(aspect_ratio_mask.shape)
            raise ValueError(f"vlmkern.models.{name}: aspect_ratio_mask must be "
                             f"{images + (t,)} (B, images, tiles), got {got}")

    def _embed(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """pixels (N·tiles, C, H, W), ids (N,) -> (N, tiles, num_patches, D): the patch GEMM
        with CLS and the tile-independent positions in its epilogue, then the per-image tile
        terms."""
        conv, pos = self.patch_embedding, self.gated_positional_embedding
        hooks = _check_fusable(self, conv)
        gate = pos.gate.tanh()
        out = patch_embed(pixels, conv.weight, pos_embed=(1 - gate) * pos.embedding,
                          cls_token=self.class_embedding, pos_interp="none", **self._image_kw())
        out = _run_hooks(hooks, pixels, out)
        n, tiles, d = ids.shape[0], self.max_num_tiles, self.hidden_size
        out = out.view(n, tiles, self.num_patches, d)
        pre = self.pre_tile_positional_embedding(ids)  # (N, tiles, 1, D), not on the CLS row
        out = torch.cat([out[:, :, :1], out[:, :, 1:] + pre], 2)
        return out + gate * pos.tile_embedding(ids).view(n, tiles, self.num_patches, d)

    def _mask(self, tile_real: torch.Tensor, per_tile: int, dtype: torch.dtype,
              device: torch.device) -> dict[str, torch.Tensor]:
        """The attention pattern of HF's aspect-ratio mask for tile_real (N, tiles) bool and
        ``per_tile`` tokens per tile (padded): ``dead`` (N, L) rows that see no key, and either
        ``kv_ranges`` (N, L, tiles, 2) for the op or ``allowed`` (N, 1, L, L) for SDPA."""
        n, tiles = tile_real.shape
        # HF marks the last per_tile - num_patches tokens of each tile padding; with no pad
        # tokens its slice [-0:] marks the whole tile (kept, to be HF's)
        real_len = self.num_patches if per_tile > self.num_patches else 0
        real_pos = torch.arange(per_tile, device=device) < real_len  # (per_tile,)
        pad = ~(tile_real[:, :, None] & real_pos).flatten(1)  # (N, L)
        dead = pad & pad.all(-1, keepdim=True)
        head_dim = self.hidden_size // self.config.attention_heads
        kernel = ((dtype in CUDA_DTYPES and head_dim in CUDA_HEAD_DIMS) if device.type == "cuda"
                  else _vt.CPU_KERNEL)
        if not kernel:
            allowed = ~(pad[:, :, None] & pad[:, None, :]) | dead[:, :, None]
            return {"dead": dead, "allowed": allowed[:, None]}
        length = tiles * per_tile
        starts = torch.arange(tiles, device=device, dtype=torch.int32) * per_tile  # (tiles,)
        ends = starts + tile_real.int() * real_len  # (N, tiles)
        padded = torch.stack([starts.expand(n, tiles), ends], -1)  # (N, tiles, 2)
        full = torch.zeros(tiles, 2, dtype=torch.int32, device=device)
        full[0, 1] = length
        ranges = torch.where(pad[:, :, None, None], padded[:, None], full)  # (N, L, tiles, 2)
        return {"dead": dead, "kv_ranges": ranges}

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        self._check(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        b, m, tiles = pixel_values.shape[:3]
        n, d, np_ = b * m, self.hidden_size, self.num_patches
        ids = aspect_ratio_ids.reshape(n)
        x = self._embed(pixel_values.flatten(0, 2), ids)  # (N, tiles, np, D)
        x = self.layernorm_pre(x)
        per_tile = np_ + (8 - np_ % 8) % 8
        x = F.pad(x, (0, 0, 0, per_tile - np_)).view(n, tiles * per_tile, d)
        mask = self._mask(aspect_ratio_mask.reshape(n, tiles) != 0, per_tile, x.dtype, x.device)
        layers = self.transformer.layers
        keep = {i % len(layers) for i in self.intermediate_layers_indices}
        kept = {}
        for i, layer in enumerate(layers):
            x = layer(x, mask)
            if i in keep:
                kept[i] = x
        inter = torch.stack([kept[i % len(layers)] for i in self.intermediate_layers_indices], -1)
        x = self.layernorm_post(x).view(n, tiles, per_tile, d)
        x = (x + self.post_tile_positional_embedding(ids)).view(n, tiles * per_tile, d)
        for layer in self.global_transformer.layers:
            x = layer(x, mask)
        x = x.view(n, tiles, per_tile, d)[:, :, :np_]
        inter = inter.reshape(n, tiles, per_tile, -1)[:, :, :np_]
        return torch.cat([x, inter], -1).reshape(b, m, tiles, np_, -1)


def cross_attention_masks(cross_attention_mask: torch.Tensor, num_vision_tokens: int,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``_prepare_cross_attention_mask``: the processor's ``(B, S, M, tiles)`` 0/1 mask ->
    (additive ``(B, 1, S, M·tiles·num_vision_tokens)`` mask in ``dtype``: 0 where visible,
    ``finfo.min`` elsewhere, all 0 on rows that see no tile; ``full_text_row_masked_out_mask``
    ``(B, 1, S, 1)``: 0 on those rows, 1 else). On the device, no host read."""
    b, s = cross_attention_mask.shape[:2]
    mask = cross_attention_mask.repeat_interleave(num_vision_tokens, dim=3).view(b, 1, s, -1)
    low = torch.finfo(dtype).min
    inverted = (1.0 - mask).to(dtype)
    additive = inverted.masked_fill(inverted.to(torch.bool), low)
    rows = (additive != low).any(-1).type_as(additive)[..., None]
    return additive * rows, rows


class Mllama(VisionLanguageModel):
    """Llama-3.2-Vision: ``lm_head(MllamaTextModel(token embeddings, cross-attention states =
    projector(tower(images)), HF's cross-attention masks))``. The image token is a plain token
    (no placeholder rows are replaced): text sees the images only through the cross-attention
    layers, each row the tiles its ``cross_attention_mask`` row marks.

    Inputs as HF's processor gives them: ``pixel_values`` ``(B, M, tiles, C, H, W)``,
    ``aspect_ratio_ids`` ``(B, M)``, ``aspect_ratio_mask`` ``(B, M, tiles)``,
    ``cross_attention_mask`` ``(B, S, M, tiles)`` (optional: without it every row sees every
    tile, as HF). A ``cross_attention_mask`` longer than the step's tokens is sliced at the
    cache's length, as HF's forward does. :meth:`generate` runs the tower once and gives each
    decode step the prompt mask's last row (HF's generate repeats it)."""

    def __init__(self, vision_model: nn.Module, projector: nn.Module, language_model: nn.Module,
                 lm_head: nn.Module) -> None:
        super().__init__(language_model, lm_head)
        self.vision_model, self.multi_modal_projector = vision_model, projector

    @classmethod
    def from_hf(cls, model: nn.Module, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, rescale: float = 1.0) -> Mllama:
        """From an ``MllamaForConditionalGeneration``: vlmkern's tower and projector hold copies
        of HF's weights; the text model and LM head are HF's modules (shared). ``mean`` / ``std``
        / ``rescale``: the processor's normalization, for raw (uint8) pixels."""
        config, inner = hf_parts("Mllama", model)
        if config.model_type != "mllama":
            raise NotImplementedError(f"vlmkern.models.Mllama: only "
                                      f"MllamaForConditionalGeneration models, got "
                                      f"{type(model).__name__} ({config.model_type!r})")
        tower = MllamaVisionTransformer.from_hf(inner.vision_model, mean=mean, std=std,
                                                rescale=rescale)
        hf_proj = inner.multi_modal_projector
        projector = copy_of(lambda: nn.Linear(hf_proj.in_features, hf_proj.out_features),
                            hf_proj)
        return cls(tower, projector, inner.language_model, model.lm_head)

    def vision_features(self, **vision_inputs: Any) -> dict[int, torch.Tensor]:
        """{}: no token's embedding is replaced (see :meth:`image_states`)."""
        return {}

    def image_states(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                     aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """HF's ``cross_attention_states``: ``(B, M·tiles·num_patches, hidden)`` in the
        projector's dtype, the projected tower output of each row's tiles in order."""
        states = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        return self.multi_modal_projector(states).flatten(1, 3)

    def language_inputs(self, input_ids: torch.Tensor, **vision_inputs: Any
                        ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(token embeddings (B, S, D), {cross_attention_states, cross_attention_mask,
        full_text_row_masked_out_mask} for HF's text model, as ``MllamaModel`` makes them; None
        where HF has None: states without pixels (decode steps read the cached image keys),
        masks without ``cross_attention_mask``)."""
        unused = set(vision_inputs) - set(_INPUTS)
        if unused:
            raise TypeError(f"vlmkern.models.Mllama: unexpected inputs {sorted(unused)} (it "
                            f"takes {', '.join(_INPUTS)})")
        embeds = self.embed_tokens(input_ids)
        pixels = vision_inputs.get("pixel_values")
        states = None if pixels is None else self.image_states(
            pixels, vision_inputs.get("aspect_ratio_ids"), vision_inputs.get("aspect_ratio_mask"))
        extra = {"cross_attention_states": states, "cross_attention_mask": None,
                 "full_text_row_masked_out_mask": None}
        mask = vision_inputs.get("cross_attention_mask")
        if mask is not None:
            tiles, seq = self.vision_model.max_num_tiles, input_ids.shape
            if mask.dim() != 4 or tuple(mask.shape[:2]) != seq or mask.shape[3] != tiles:
                raise ValueError(f"vlmkern.models.Mllama: cross_attention_mask must be "
                                 f"(B, S, images, {tiles}) with (B, S) = {tuple(seq)}, got "
                                 f"{tuple(mask.shape)}")
            extra["cross_attention_mask"], extra["full_text_row_masked_out_mask"] = \
                cross_attention_masks(mask, self.vision_model.num_patches, embeds.dtype)
        return embeds, extra

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                past_key_values: Any = None, use_cache: bool = False,
                rope_deltas: torch.Tensor | None = None, logits_to_keep: int = 0,
                **vision_inputs: Any) -> VLMOutput:
        """As :meth:`VisionLanguageModel.forward`; a ``cross_attention_mask`` covering the cache
        too (``past + S`` rows) is cut to this step's rows, as HF's forward does."""
        mask = vision_inputs.get("cross_attention_mask")
        seq = input_ids.shape[1]
        if mask is not None and mask.dim() == 4 and mask.shape[1] != seq:
            past = 0 if past_key_values is None else int(past_key_values.get_seq_length())
            vision_inputs["cross_attention_mask"] = mask[:, past:past + seq]
        return super().forward(input_ids, attention_mask=attention_mask,
                               past_key_values=past_key_values, use_cache=use_cache,
                               rope_deltas=rope_deltas, logits_to_keep=logits_to_keep,
                               **vision_inputs)

    def decode_inputs(self, vision_inputs: dict[str, Any]) -> dict[str, Any]:
        """Decode steps get ``cross_attention_mask``'s last row, as HF's generate extends it
        (the image keys and values are in the cache's cross-attention layers)."""
        xmask = vision_inputs.get("cross_attention_mask")
        return {} if xmask is None else {"cross_attention_mask": xmask[:, -1:]}
