"""Idefics3 / SmolVLM from vlmkern pieces: the SigLIP-style tower with bucketized (NaViT) positions,
vlmkern's fused pixel-shuffle connector and HF's language model, built from a ``transformers``
``Idefics3ForConditionalGeneration`` or ``SmolVLMForConditionalGeneration``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.patch_embed import _check_fusable, _Normalizing, _run_hooks
from ..nn.projector import Idefics3Connector
from ..ops.patch_embed import patch_embed
from ._common import check_pixels, copy_of, hf_parts, pixel_dtype
from .vision_transformer import ViTEncoderLayer
from .vlm import VisionLanguageModel, scatter_features

_HF_TOWERS = ("Idefics3VisionTransformer", "SmolVLMVisionTransformer")
_MODEL_TYPES = ("idefics3", "smolvlm")


class Idefics3VisionEmbeddings(_Normalizing):
    """HF ``Idefics3VisionEmbeddings`` / ``SmolVLMVisionEmbeddings``: Conv2d with bias + a learned
    ``(S·S, D)`` position table, S = image_size / patch_size. An image of ``h × w`` real patches
    takes, for patch ``(i, j)``, the table row ``bucket(i / h) · S + bucket(j / w)`` (the bucket
    of its fractional coordinate among ``1/S, 2/S, …``; computed with HF's float32 steps, which
    for some S differ from ``i`` even on a full ``S × S`` grid); padded patches take row 0.

    ``forward(pixels (M, C, H, W), patch_attention_mask=None)`` -> ``(M, (H/P)·(W/P), D)`` in the
    weights' dtype. Without a mask every patch is real: one fused patch_embed call, the position
    rows (the same for every image) added in its epilogue. With a mask ``(M, H/P,
    W/P)`` bool (True = real patch) the rows of each image come from its own real-patch counts
    (HF reads them from the first column and row of the mask), added after the op. No host
    sync either way."""

    def __init__(self, config: Any, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, rescale: float = 1.0) -> None:
        super().__init__(mean, std, rescale)
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, self.embed_dim,
                                         kernel_size=self.patch_size, stride=self.patch_size,
                                         padding="valid")
        self.num_patches_per_side = self.image_size // self.patch_size
        self.num_patches = self.num_patches_per_side**2
        self.num_positions = self.num_patches
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)

    def position_ids(self, patch_attention_mask: torch.Tensor) -> torch.Tensor:
        """(M, h, w) bool -> (M, h·w) int64 rows of the position table, on the mask's device."""
        mask, side = patch_attention_mask, self.num_patches_per_side
        device = mask.device
        edges = torch.arange(1 / side, 1.0, 1 / side, device=device)  # float32, as HF's

        def buckets(real: torch.Tensor, size: int) -> torch.Tensor:  # real (M,) -> (M, size)
            index = torch.arange(size, device=device, dtype=torch.float32)
            frac = (index[None] * (1.0 / real)[:, None]).clamp(max=1.0 - 1e-6)
            return torch.bucketize(frac, edges, right=True)

        rows = buckets(mask[:, :, 0].sum(1), mask.shape[1])  # (M, h)
        cols = buckets(mask[:, 0, :].sum(1), mask.shape[2])  # (M, w)
        ids = (rows[:, :, None] * side + cols[:, None, :]).flatten(1)
        return ids.masked_fill(~mask.flatten(1), 0)

    def forward(self, pixel_values: torch.Tensor,
                patch_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        conv, table = self.patch_embedding, self.position_embedding
        hooks = _check_fusable(self, conv, table)
        if patch_attention_mask is None:
            p = self.patch_size
            grid = (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p)
            full = torch.ones(1, *grid, dtype=torch.bool, device=pixel_values.device)
            pos = table.weight[self.position_ids(full)[0]]  # (h·w, D)
            out = patch_embed(pixel_values, conv.weight, conv.bias, pos_embed=pos,
                              pos_interp="none", **self._image_kw())
        else:
            out = patch_embed(pixel_values, conv.weight, conv.bias, **self._image_kw())
            out = out + F.embedding(self.position_ids(patch_attention_mask), table.weight)
        return _run_hooks(hooks, pixel_values, out)


class Idefics3EncoderLayer(ViTEncoderLayer):
    """HF ``Idefics3EncoderLayer`` (SigLIP's, same parameter names), with an optional key mask:
    ``forward(x (M, S, D), key_mask=None (M, S) bool)``. Without it, vlmkern's SigLIP layer
    (the cross_attention op on CUDA); with it, torch SDPA over the real keys only (every query
    row, padded ones too, as HF)."""

    def forward(self, hidden_states: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if key_mask is None:
            return super().forward(hidden_states)
        attn, (b, s, _) = self.self_attn, hidden_states.shape
        h = self.layer_norm1(hidden_states)
        q, k, v = (p(h).view(b, s, attn.num_heads, -1).transpose(1, 2)
                   for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :],
            dropout_p=attn.dropout if self.training else 0.0, scale=attn.scale)
        hidden_states = hidden_states + attn.out_proj(out.transpose(1, 2).reshape(b, s, -1))
        return self.mlp(hidden_states, self.layer_norm2)


class _Encoder(nn.Module):
    """HF ``Idefics3Encoder``'s ``layers``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Idefics3EncoderLayer(config)
                                    for _ in range(config.num_hidden_layers))


class Idefics3VisionTransformer(nn.Module):
    """HF ``Idefics3VisionTransformer`` / ``SmolVLMVisionTransformer``: bucketized-position
    embeddings -> SigLIP layers -> ``post_layernorm``; no pooling head.

    ``forward(pixel_values (M, C, H, W), patch_attention_mask=None (M, H/P, W/P) bool)`` ->
    HF's ``last_hidden_state`` ``(M, (H/P)·(W/P), D)`` in the weights' dtype. ``pixel_values``
    float (cast to the weights' dtype, as HF) or uint8 (given ``mean`` / ``std`` / ``rescale``,
    folded into the patch embedding). Without a mask (HF's all-True default) the fused path
    runs: positions in the patch_embed epilogue, unmasked attention (vlmkern's kernel on CUDA).
    With one, padded patches are masked out as keys (torch SDPA with a boolean mask) and get
    HF's positions; the mask's values are never read on the host, so an all-True mask gives
    the same result by the masked path rather than being detected (that would be a host sync,
    which HF's mask construction makes)."""

    def __init__(self, config: Any, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, rescale: float = 1.0) -> None:
        super().__init__()
        self.config = config
        self.num_channels, self.patch_size = config.num_channels, config.patch_size
        self.embeddings = Idefics3VisionEmbeddings(config, mean=mean, std=std, rescale=rescale)
        self.encoder = _Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @classmethod
    def from_hf(cls, model: nn.Module, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None,
                rescale: float = 1.0) -> Idefics3VisionTransformer:
        """A copy of HF's tower (or of the ``.vision_model`` of an ``Idefics3Model`` /
        ``SmolVLMModel``), on its device and dtype, in its train / eval mode. ``mean`` / ``std``
        / ``rescale``: the processor's normalization, for uint8 pixels."""
        model = getattr(model, "vision_model", model)
        name = type(model).__name__
        if name not in _HF_TOWERS:
            raise NotImplementedError(f"vlmkern.models.Idefics3VisionTransformer: HF's {name} is "
                                      f"not one of {', '.join(_HF_TOWERS)}")
        return copy_of(lambda: cls(model.config, mean=mean, std=std, rescale=rescale), model)

    def forward(self, pixel_values: torch.Tensor,
                patch_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        owner, emb, p = type(self).__name__, self.embeddings, self.patch_size
        check_pixels(owner, pixel_values, self.num_channels, emb)
        grid = (pixel_values.shape[0], pixel_values.shape[2] // p, pixel_values.shape[3] // p)
        if patch_attention_mask is not None and (patch_attention_mask.shape != grid
                                                 or patch_attention_mask.dtype != torch.bool):
            raise ValueError(f"vlmkern.models.{owner}: patch_attention_mask must be bool "
                             f"{grid} (images, H/P, W/P), got {patch_attention_mask.dtype} "
                             f"{tuple(patch_attention_mask.shape)}")
        hidden_states = emb(pixel_values, patch_attention_mask)
        key_mask = None if patch_attention_mask is None else patch_attention_mask.flatten(1)
        for layer in self.encoder.layers:
            hidden_states = layer(hidden_states, key_mask)
        return self.post_layernorm(hidden_states)


class Idefics3(VisionLanguageModel):
    """``lm_head(LLM(embeds with connector(tower(images)) in the image tokens))`` for Idefics3 and
    SmolVLM (``model_type``).

    Pixels come as HF's processor gives them: ``pixel_values`` ``(B, N, C, H, W)`` (N images per
    row, shorter rows padded with all-zero images) and optionally ``pixel_attention_mask``
    ``(B, N, H, W)`` (nonzero = real pixel; a patch with any real pixel is real). Each real image
    gives ``T = (H/P)·(W/P) / scale_factor²`` features for as many ``image_token_id``
    placeholders, images in row-major order. An image is padding when all its values are 0
    after the cast to the model's dtype (HF's rule for its normalized floats). With raw pixels
    (uint8, or floats given ``mean`` / ``std``), where 0 is black, an image is padding when its
    ``pixel_attention_mask`` is all 0, and without a mask every image is real. Raw pixels
    match HF's result where no real image has padded pixels (what the stock processors give:
    full squares); HF's padded pixels are 0 after normalization, which a uint8 canvas cannot
    hold. SmolVLM keeps the first image when every image is padding, as HF does.

    HF drops padding images before the tower (a data-dependent count: a host sync).
    :meth:`forward` (through :meth:`language_inputs`) does not: every image runs the tower and
    connector, the real images' features are moved to the front by a stable argsort and the
    placeholders consume them in order, with the count checked on the device. That costs the
    padding images' compute and keeps the prefill free of host syncs (one graph under
    ``torch.compile``). :meth:`vision_features` returns HF's ``get_image_features`` rows
    exactly, by a boolean selection (host sync).

    With ``pixel_attention_mask`` the tower takes its masked path (positions from each image's
    real patches, SDPA with a key mask), even when the mask is all ones, as the processor's
    usually is: telling that apart would be a host sync. Without it (every patch real, HF's
    default) the fused path runs; leave the mask out when every image is known to fill its
    ``H × W`` (its mask all ones): the result is the same up to rounding."""

    def __init__(self, vision_model: nn.Module, connector: nn.Module, language_model: nn.Module,
                 lm_head: nn.Module, *, image_token_id: int, model_type: str = "idefics3") -> None:
        super().__init__(language_model, lm_head)
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"vlmkern.models.Idefics3: model_type must be one of "
                             f"{_MODEL_TYPES}, got {model_type!r}")
        self.vision_model, self.connector = vision_model, connector
        self.image_token_id, self.model_type = image_token_id, model_type

    @classmethod
    def from_hf(cls, model: nn.Module, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, rescale: float = 1.0) -> Idefics3:
        """From an ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration``:
        vlmkern's tower and connector hold copies of HF's weights; the language model and LM
        head are HF's modules themselves (shared). ``mean`` / ``std`` / ``rescale``: the image
        processor's normalization, folded into the patch embedding; the model then takes raw
        pixels (uint8, or floats of the same values). Without them it takes normalized float
        pixels, as HF."""
        config, inner = hf_parts("Idefics3", model)
        if config.model_type not in _MODEL_TYPES:
            raise NotImplementedError(f"vlmkern.models.Idefics3: only Idefics3 / SmolVLM "
                                      f"ForConditionalGeneration models, got "
                                      f"{type(model).__name__} ({config.model_type!r})")
        tower = Idefics3VisionTransformer.from_hf(inner.vision_model, mean=mean, std=std,
                                                  rescale=rescale)
        connector = copy_of(lambda: Idefics3Connector.from_config(config), inner.connector)
        return cls(tower, connector, inner.text_model, model.lm_head,
                   image_token_id=config.image_token_id, model_type=config.model_type)

    def _check(self, unused: dict[str, Any]) -> None:
        if unused:
            raise TypeError(f"vlmkern.models.Idefics3: unexpected inputs {sorted(unused)} (it "
                            "takes pixel_values, pixel_attention_mask)")

    def encode_images(self, pixel_values: torch.Tensor,
                      pixel_attention_mask: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image through the tower and connector: ``(features (B·N, T, D) in the
        connector's dtype, real (B·N,) bool)``, ``real`` False for padding images (whose
        features are to be dropped)."""
        name, tower = "vlmkern.models.Idefics3", self.vision_model
        if pixel_values.dim() != 5 or pixel_values.shape[2] != tower.num_channels:
            raise ValueError(f"{name}: pixel_values must be (B, N_images, {tower.num_channels}, "
                             f"H, W), got shape {tuple(pixel_values.shape)}")
        b, n, _, height, width = pixel_values.shape
        p, r = tower.patch_size, self.connector.scale_factor
        side = height // p
        if not side or width // p != side or side % r:
            raise ValueError(f"{name}: the patch grid must be square with a side divisible by "
                             f"scale_factor {r} (the connector's pixel shuffle), got "
                             f"{height // p} x {width // p} patches of {p} from {height} x "
                             f"{width} pixels")
        if pixel_values.is_floating_point():
            pixel_values = pixel_values.to(pixel_dtype(tower))
        pixels = pixel_values.flatten(0, 1)  # (B·N, C, H, W)
        if pixel_attention_mask is not None and pixel_attention_mask.shape != (b, n, height,
                                                                                width):
            raise ValueError(f"{name}: pixel_attention_mask must be (B, N_images, H, W) = "
                             f"{(b, n, height, width)}, got {tuple(pixel_attention_mask.shape)}")
        emb = tower.embeddings
        if emb.pixel_mean is None and emb.pixel_std is None and emb.rescale == 1.0:
            real = pixels.flatten(1).ne(0).any(1)  # (B·N,): HF's rule on normalized pixels
        elif pixel_attention_mask is not None:  # raw pixels: a black image is real
            real = pixel_attention_mask.flatten(0, 1).flatten(1).ne(0).any(1)
        else:
            real = torch.ones(b * n, dtype=torch.bool, device=pixels.device)
        if self.model_type == "smolvlm":  # no real image at all: HF keeps the first
            real = torch.cat([real[:1] | ~real.any(), real[1:]])
        patches = None
        if pixel_attention_mask is not None:
            mask = pixel_attention_mask.flatten(0, 1)[:, : side * p, : side * p] != 0
            patches = mask.reshape(b * n, side, p, side, p).any(4).any(2)  # (B·N, h, w)
            # padding images (their features are dropped) run unmasked: a query row that sees
            # no key is 0 in torch's CPU SDPA, but not every CUDA backend promises it, and a NaN
            # there would reach the weights' gradients. (SmolVLM's kept first image, when all
            # are padding, runs with its all-zero mask, as in HF.)
            patches = patches | ~real[:, None, None]
        return self.connector(tower(pixels, patches)), real

    def vision_features(self, pixel_values: torch.Tensor | None = None,
                        pixel_attention_mask: torch.Tensor | None = None,
                        **unused: Any) -> dict[int, torch.Tensor]:
        """HF's ``get_image_features``: {image_token_id: (n_real · T, D)}, the real images'
        features in order. ``n_real`` is data-dependent: a host sync (the forward does not use
        this; see the class docstring)."""
        self._check(unused)
        if pixel_values is None:
            return {}
        features, real = self.encode_images(pixel_values, pixel_attention_mask)
        return {self.image_token_id: features[real].flatten(0, 1)}

    def language_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                        pixel_attention_mask: torch.Tensor | None = None, **unused: Any,
                        ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(``inputs_embeds`` (B, S, D) with the real images' features in the placeholder rows,
        {}), without a host sync."""
        self._check(unused)
        embeds = self.embed_tokens(input_ids)  # (B, S, D)
        if pixel_values is None:
            return embeds, {}
        features, real = self.encode_images(pixel_values, pixel_attention_mask)
        order = torch.argsort((~real).int(), stable=True)  # real images first, in order
        rows = features[order].flatten(0, 1)  # (B·N·T, D), the first n_real·T used
        return scatter_features(embeds, input_ids, self.image_token_id, rows,
                                used=real.sum() * features.shape[1],
                                what=f"the number of real (not padding) images times "
                                     f"{features.shape[1]}"), {}
