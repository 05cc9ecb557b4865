"""InternVL (2.5 / 3 / 3.5 in transformers' format) from vlmkern pieces: the InternViT tower
(fused patch embedding with CLS and positions, cross_attention, the norm-prologue mlp_projector,
layer scale), InternVL's projector with the pixel shuffle fused into its LayerNorm, and HF's
language model, built from a ``transformers`` ``InternVLForConditionalGeneration``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..nn.patch_embed import InternVLVisionEmbeddings
from ..nn.projector import InternVLMultiModalProjector, QwenRMSNorm
from ._common import check_pixels, copy_of, hf_parts, layers_to_run, norm_mlp, pixel_dtype
from .vision_transformer import ViTMLP, attend, head_dim_of
from .vlm import VisionLanguageModel


def _norm(config: Any, dim: int) -> nn.Module:
    """InternViT's ``norm_type``: LayerNorm (InternViT-300M) or RMSNorm (InternViT-6B)."""
    if config.norm_type == "layer_norm":
        return nn.LayerNorm(dim, eps=config.layer_norm_eps)
    if config.norm_type == "rms_norm":
        return QwenRMSNorm(dim, eps=config.layer_norm_eps)
    raise ValueError(f"vlmkern.models: InternViT norm_type must be 'layer_norm' or 'rms_norm', "
                     f"got {config.norm_type!r}")


class InternViTAttention(nn.Module):
    """HF ``InternVLVisionAttention``: ``q_proj`` / ``k_proj`` / ``v_proj`` (bias per
    ``config.attention_bias``), optional ``q_norm`` / ``k_norm`` (RMSNorm over all heads,
    ``config.use_qk_norm``), ``projection_layer``. ``(B, S, D) -> (B, S, D)``, no mask."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        dim, self.num_heads = config.hidden_size, config.num_attention_heads
        self.scale = head_dim_of(dim, self.num_heads) ** -0.5
        self.dropout = float(config.attention_dropout)
        bias = config.attention_bias
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.projection_layer = nn.Linear(dim, dim)
        self.projection_dropout = nn.Dropout(config.projection_dropout)
        qk_norm = config.use_qk_norm  # HF's RMSNorm at its default eps, not layer_norm_eps
        self.q_norm = QwenRMSNorm(dim) if qk_norm else None
        self.k_norm = QwenRMSNorm(dim) if qk_norm else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        q, k, v = (p(hidden_states) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, S, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(b, s, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = attend(q, k, v, self.scale, self.dropout if self.training else 0.0)  # (B, H, S, hd)
        out = self.projection_layer(out.transpose(1, 2).reshape(b, s, -1))
        return self.projection_dropout(out)


class InternViTMLP(ViTMLP):
    """HF ``InternVLVisionMLP`` (``fc1``, ``fc2``, ``config.hidden_act``, as CLIP's) with its
    pre-norm but no residual (the layer scales the output first):
    ``forward(x (..., D), norm) = fc2(act(fc1(norm(x))))``, one mlp_projector call."""

    def forward(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return norm_mlp(x, norm, self.fc1, self.fc2, self.activation)


class InternViTLayer(nn.Module):
    """HF ``InternVLVisionLayer``: ``x + lambda_1 · attn(layernorm_before(x))``, then
    ``x + lambda_2 · dropout(mlp(layernorm_after(x)))``. ``(B, S, D) -> (B, S, D)``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        dim = config.hidden_size
        self.attention = InternViTAttention(config)
        self.mlp = InternViTMLP(config)
        self.layernorm_before = _norm(config, dim)
        self.layernorm_after = _norm(config, dim)
        self.lambda_1 = nn.Parameter(torch.full((dim,), float(config.layer_scale_init_value)))
        self.lambda_2 = nn.Parameter(torch.full((dim,), float(config.layer_scale_init_value)))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attn = self.attention(self.layernorm_before(hidden_states))
        hidden_states = hidden_states + self.lambda_1 * attn
        mlp = self.dropout(self.mlp(hidden_states, self.layernorm_after))
        return hidden_states + self.lambda_2 * mlp


class InternViTEncoder(nn.Module):
    """HF ``InternVLVisionEncoder``'s ``layer`` list."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layer = nn.ModuleList(InternViTLayer(config) for _ in range(config.num_hidden_layers))


class InternVLVisionTransformer(nn.Module):
    """HF ``InternVLVisionModel`` (InternViT-300M / 6B): embeddings (CLS first, positions) ->
    layers -> ``layernorm`` (an identity with ``config.use_mean_pooling``, HF's default).
    ``mean`` / ``std`` / ``rescale``: the processor's normalization, folded into the patch
    embedding for uint8 pixels (see :class:`vlmkern.nn.InternVLVisionEmbeddings`)."""

    def __init__(self, config: Any, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, rescale: float = 1.0) -> None:
        super().__init__()
        self.config = config
        self.embeddings = InternVLVisionEmbeddings(config, mean=mean, std=std, rescale=rescale)
        self.encoder = InternViTEncoder(config)
        self.layernorm = (nn.Identity() if config.use_mean_pooling else
                          nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))

    @classmethod
    def from_hf(cls, model: nn.Module, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None,
                rescale: float = 1.0) -> InternVLVisionTransformer:
        """A copy of HF's ``InternVLVisionModel`` on its device and dtype, in its train / eval
        mode."""
        return copy_of(lambda: cls(model.config, mean=mean, std=std, rescale=rescale), model)

    def forward(self, pixel_values: torch.Tensor, *,
                feature_layer: int | None = None) -> torch.Tensor:
        """pixel_values ``(B, C, H, W)`` float (cast to the weights' dtype) or uint8 (with the
        normalization given at construction) -> ``(B, 1 + (H/P)(W/P), D)``: HF's
        ``last_hidden_state`` with ``feature_layer=None``, else HF's
        ``hidden_states[feature_layer]`` (0 the embeddings, i layer i's output, negative from
        the end), without running the layers after it. Positions are bicubic-resized where the
        grid differs from the table's, as HF."""
        name = type(self).__name__
        stop = layers_to_run(name, len(self.encoder.layer), feature_layer)
        check_pixels(name, pixel_values, self.config.num_channels, self.embeddings)
        if pixel_values.is_floating_point():
            pixel_values = pixel_values.to(pixel_dtype(self))
        hidden_states = self.embeddings(pixel_values)  # (B, 1 + N, D)
        for layer in self.encoder.layer[:stop]:
            hidden_states = layer(hidden_states)
        return self.layernorm(hidden_states) if feature_layer is None else hidden_states


class InternVL(VisionLanguageModel):
    """``lm_head(LLM(embeds with projector(shuffle(tower(pixels)[feature_layer][:, 1:])) in the
    image tokens))``: each image (tile) of ``(H/P) x (W/P)`` patches gives ``(H/P)(W/P) / r²``
    features (r = 1 / ``downsample_ratio``, 2 for InternVL) for as many ``image_token_id``
    placeholders. The projector takes the tower's rows as they are: InternVL's pixel shuffle
    and the LayerNorm after it run as one kernel on CUDA (no separate shuffled copy).
    ``forward(input_ids, pixel_values=None, ...)``: see :meth:`VisionLanguageModel.forward`;
    video frames are images to InternVL."""

    def __init__(self, vision_tower: nn.Module, projector: InternVLMultiModalProjector,
                 language_model: nn.Module, lm_head: nn.Module, *, image_token_id: int,
                 feature_layer: int = -1, select_strategy: str = "default") -> None:
        super().__init__(language_model, lm_head)
        if select_strategy != "default":  # HF's reshape to a square grid fails with the CLS row
            raise ValueError(f"vlmkern.models.InternVL: select_strategy must be 'default' (the "
                             f"CLS row dropped), got {select_strategy!r}")
        if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
            raise NotImplementedError("vlmkern.models.InternVL: feature_layer must be one int "
                                      f"(a list of layers is not supported), got "
                                      f"{feature_layer!r}")
        self.vision_tower, self.multi_modal_projector = vision_tower, projector
        self.image_token_id, self.feature_layer = image_token_id, feature_layer

    @classmethod
    def from_hf(cls, model: nn.Module, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, rescale: float = 1.0) -> InternVL:
        """From an ``InternVLForConditionalGeneration``: vlmkern's tower and projector hold
        copies of HF's weights; the language model and LM head are HF's modules (shared).
        ``mean`` / ``std`` / ``rescale``: the image processor's normalization, folded into the
        patch embedding; the model then takes raw pixels (uint8, or floats of the same values).
        Without them it takes normalized float pixels, as HF."""
        config, inner = hf_parts("InternVL", model)
        if config.model_type != "internvl":
            raise NotImplementedError(f"vlmkern.models.InternVL: only InternVL models "
                                      f"(model_type 'internvl'), got {config.model_type!r}")
        projector = copy_of(lambda: InternVLMultiModalProjector.from_config(config),
                            inner.multi_modal_projector)
        tower = InternVLVisionTransformer.from_hf(inner.vision_tower, mean=mean, std=std,
                                                  rescale=rescale)
        return cls(tower, projector, inner.language_model, model.lm_head,
                   image_token_id=config.image_token_id,
                   feature_layer=config.vision_feature_layer,
                   select_strategy=config.vision_feature_select_strategy)

    def vision_features(self, pixel_values: torch.Tensor | None = None,
                        **unused: Any) -> dict[int, torch.Tensor]:
        """pixel_values (B, C, H, W), square grids of patches divisible by the shuffle factor,
        float (cast to the tower's dtype) or uint8 (given the normalization at
        construction) -> {image_token_id: (B · T, D)}."""
        if unused:
            raise TypeError(f"vlmkern.models.InternVL: unexpected inputs {sorted(unused)}")
        if pixel_values is None:
            return {}
        tower, proj = self.vision_tower, self.multi_modal_projector
        check_pixels("InternVL", pixel_values, tower.config.num_channels, tower.embeddings)
        ph, pw = tower.embeddings.patch_size
        grid = (pixel_values.shape[2] // ph, pixel_values.shape[3] // pw)
        if grid[0] != grid[1] or grid[0] % proj.scale:
            raise ValueError(f"vlmkern.models.InternVL: images must give a square grid of "
                             f"patches divisible by {proj.scale} (HF's reshape and pixel "
                             f"shuffle), got {grid} from {tuple(pixel_values.shape[2:])} pixels")
        layer = None if self.feature_layer == -1 else self.feature_layer  # HF: -1 = last state
        h = tower(pixel_values, feature_layer=layer)[:, 1:]  # (B, N, C_v), CLS dropped
        return {self.image_token_id: proj(h, grid=grid).flatten(0, 1)}  # (B · N r⁻², D)
