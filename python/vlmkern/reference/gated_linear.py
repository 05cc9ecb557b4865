"""Reference for vlmkern.ops.gated_linear: HF Mllama's gated residual after o_proj, in plain
PyTorch (run it in float64 for ground truth)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_linear(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor,
                 residual: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + tanh(gate) · (x @ weightᵀ + bias)``; x (..., K), weight (N, K), gate one
    value, residual (..., N)."""
    return residual + gate.reshape(()).tanh() * F.linear(x, weight, bias)
