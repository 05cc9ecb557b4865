"""What the vlmkern.models towers share: the pre-norm MLP as one mlp_projector call, which layers
a ``feature_layer`` needs, the pixel checks, and the construction of a tower holding a copy of an
HF module's weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..nn._fusable import fusable
from ..nn.projector import QwenRMSNorm
from ..ops.mlp_projector import mlp_projector
from ..reference.mlp_projector import activation_fn


def norm_mlp(x: torch.Tensor, norm: nn.Module, fc1: nn.Linear, fc2: nn.Linear,
             activation: str) -> torch.Tensor:
    """``fc2(act(fc1(norm(x))))`` for ``x`` (..., D) -> (..., D_out), ``norm`` an nn.LayerNorm or
    a QwenRMSNorm (HF's fp32-statistics RMSNorm): one mlp_projector with the norm as its
    prologue; HF's math module by module where a Linear or the norm is wrapped or hooked (PEFT,
    quantization), so the wrapper is not bypassed."""
    if not fusable(norm, fc1, fc2, types=(nn.LayerNorm, QwenRMSNorm, nn.Linear)):
        return fc2(activation_fn(fc1(norm(x)), activation))
    rms = isinstance(norm, QwenRMSNorm)
    return mlp_projector(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation=activation,
                         norm="rmsnorm" if rms else "layernorm", norm_weight=norm.weight,
                         norm_bias=None if rms else norm.bias,
                         eps=norm.variance_epsilon if rms else norm.eps)


def residual_norm_mlp(x: torch.Tensor, norm: nn.Module, fc1: nn.Linear, fc2: nn.Linear,
                      activation: str) -> torch.Tensor:
    """``x + fc2(act(fc1(norm(x))))``: :func:`norm_mlp` plus the residual."""
    return x + norm_mlp(x, norm, fc1, fc2, activation)


def layers_to_run(owner: str, n: int, feature_layer: int | None) -> int:
    """How many of a tower's ``n`` layers produce HF's ``hidden_states[feature_layer]`` (0 the
    embeddings, i layer i's output, negative from the end); all ``n`` for None. ``owner``
    names the tower in the error for anything else."""
    if feature_layer is None:
        return n
    if (isinstance(feature_layer, bool) or not isinstance(feature_layer, int)
            or not -n - 1 <= feature_layer <= n):
        raise ValueError(f"vlmkern.models.{owner}: feature_layer must be None or an int in "
                         f"[{-n - 1}, {n}] (HF's hidden_states has {n + 1} entries: 0 the "
                         f"embeddings, i layer i's output), got {feature_layer!r}")
    return feature_layer % (n + 1)


def hf_parts(owner: str, model: nn.Module) -> tuple:
    """(config, inner model) of an HF ``*ForConditionalGeneration`` VLM (its ``.model`` holds
    the tower and language model, ``.lm_head`` the head); anything else raises
    NotImplementedError naming ``owner`` (e.g. the inner ``*Model`` given by mistake)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(model, "lm_head") or not hasattr(model, "config"):
        raise NotImplementedError(f"vlmkern.models.{owner}.from_hf takes an HF "
                                  f"*ForConditionalGeneration model (with .model and .lm_head), "
                                  f"got {type(model).__name__}")
    return model.config, inner


def pixel_dtype(tower: nn.Module) -> torch.dtype:
    """The dtype float pixels are cast to for ``tower``: its patch embedding's (HF casts to the
    model's dtype; a projector quantized or wrapped elsewhere does not change it)."""
    return next(tower.embeddings.parameters()).dtype


def check_pixels(owner: str, pixel_values: torch.Tensor, channels: int,
                 embeddings: nn.Module) -> None:
    """Image pixels must be (B, channels, H, W); uint8 ones need the processor's normalization
    held by ``embeddings`` (a vlmkern.nn embedding module)."""
    if pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
        raise ValueError(f"vlmkern.models.{owner}: pixel_values must be (B, {channels}, H, W), "
                         f"got shape {tuple(pixel_values.shape)}")
    if (pixel_values.dtype == torch.uint8 and embeddings.pixel_mean is None
            and embeddings.pixel_std is None and embeddings.rescale == 1.0):
        raise ValueError(f"vlmkern.models.{owner}: uint8 pixels need the processor's "
                         "normalization: pass mean / std / rescale to the constructor or "
                         "from_hf")


def copy_of(build: Callable[[], nn.Module], hf: nn.Module, buffers: bool = True) -> nn.Module:
    """``build()`` made on the meta device (no random init), then moved to ``hf``'s device and
    dtype (those of its first parameter), given a copy of its state dict (strict) and, with
    ``buffers``, of its non-persistent buffers, and put in its train / eval mode."""
    ref = next(hf.parameters())
    with torch.device("meta"):
        ours = build()
    ours = ours.to_empty(device=ref.device).to(ref.dtype)
    ours.load_state_dict(hf.state_dict(), strict=True)
    state = hf.state_dict()
    with torch.no_grad():
        for name, buffer in hf.named_buffers():  # e.g. CLIP's position_ids
            if buffers and name not in state:
                ours.get_buffer(name).copy_(buffer)
    return ours.train(hf.training)
