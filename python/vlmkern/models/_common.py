"""What the vlmkern.models towers share: the residual pre-norm MLP as one mlp_projector call, and
the construction of a tower holding a copy of an HF module's weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..nn._fusable import fusable
from ..ops.mlp_projector import mlp_projector
from ..reference.mlp_projector import activation_fn


def residual_norm_mlp(x: torch.Tensor, norm: nn.LayerNorm, fc1: nn.Linear, fc2: nn.Linear,
                      activation: str) -> torch.Tensor:
    """``x + fc2(act(fc1(norm(x))))`` for ``x`` (..., D): one mlp_projector with the LayerNorm as
    its prologue; HF's math module by module where a Linear or the norm is wrapped or hooked
    (PEFT, quantization), so the wrapper is not bypassed."""
    if not fusable(norm, fc1, fc2, types=(nn.LayerNorm, nn.Linear)):
        return x + fc2(activation_fn(fc1(norm(x)), activation))
    return x + mlp_projector(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation=activation,
                             norm="layernorm", norm_weight=norm.weight, norm_bias=norm.bias,
                             eps=norm.eps)


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
