"""Gated residual Linear of Llama-3.2-Vision (Mllama) and Flamingo cross-attention layers,
``residual + tanh(gate) · (x @ weightᵀ + bias)``: public wrapper, fake kernels and autograd for
``torch.ops.vlmkern.gated_linear``. On CUDA the gate and the residual ride in the GEMM's epilogue
(one cuBLASLt matmul: tanh(gate) is its device-side alpha, the residual its C operand), so the
un-gated projection is never written."""

from __future__ import annotations

import torch

from ._autocast import register_autocast

_OP = "gated_linear"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def gated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    residual: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + tanh(gate) · (x @ weightᵀ + bias)``, HF Mllama's
    ``residual + self.cross_attn_attn_gate.tanh() * self.o_proj(attn)`` in one op.

    Args:
        x: ``(..., K)`` fp32 / fp16 / bf16 (fp64 too on the CPU), any strides.
        weight: ``(N, K)``, ``nn.Linear``'s layout, x's dtype and device.
        gate: one value (shape ``()`` or ``(1,)``, any float dtype), on x's device; ``tanh`` is
            taken in fp32. Never read on the host on CUDA (capturable in a CUDA graph).
        residual: ``(..., N)`` (x's leading dims), x's dtype.
        bias: optional ``(N,)``; it is gated too, as in ``tanh(gate) · Linear(x)``.

    Returns:
        A new contiguous ``(..., N)`` tensor in x's dtype. Differentiable in every input; the
        gate's gradient is ``(1 - tanh²) · <grad, x @ weightᵀ + bias>``, computed from the
        GEMMs the other gradients need, without keeping the un-gated output.
    """
    return torch.ops.vlmkern.gated_linear(x, weight, gate, residual, bias)


# ---- fake kernels: the checks and messages of csrc/common/gated_linear.cpp ---------------------


def _check_same(t: torch.Tensor, x: torch.Tensor, name: str) -> None:
    torch._check(t.device == x.device,
                 lambda: f"vlmkern.{_OP}: {name} is on {t.device} but x is on {x.device}")
    torch._check(t.dtype == x.dtype,
                 lambda: f"vlmkern.{_OP}: {name} has dtype {t.dtype} but x has {x.dtype} (cast "
                 "them to one dtype)")


def _check(x, weight, gate, residual, bias) -> list[int]:
    torch._check(x.dim() >= 1, lambda: f"vlmkern.{_OP}: x must have at least 1 dimension "
                 "(..., K), got a 0-D tensor")
    torch._check(x.dtype in _FLOATS, lambda: f"vlmkern.{_OP}: x must be float32, float16, "
                 f"bfloat16 or float64, got {x.dtype}")
    torch._check(weight.dim() == 2, lambda: f"vlmkern.{_OP}: weight must be a 2-D tensor (N, K), "
                 f"got {weight.dim()}-D of shape {list(weight.shape)}")
    _check_same(weight, x, "weight")
    k, n = x.shape[-1], weight.shape[0]
    torch._check(weight.shape[1] == k, lambda: f"vlmkern.{_OP}: weight (N, K) = "
                 f"{list(weight.shape)} does not match x's last dimension K={k}")
    torch._check(gate.numel() == 1, lambda: f"vlmkern.{_OP}: gate must hold one value (shape () "
                 f"or (1,)), got shape {list(gate.shape)}")
    torch._check(gate.dtype in _FLOATS, lambda: f"vlmkern.{_OP}: gate must be a floating-point "
                 f"tensor, got {gate.dtype}")
    torch._check(gate.device == x.device,
                 lambda: f"vlmkern.{_OP}: gate is on {gate.device} but x is on {x.device}")
    out = [*x.shape[:-1], n]
    _check_same(residual, x, "residual")
    torch._check(list(residual.shape) == out, lambda: f"vlmkern.{_OP}: residual must have the "
                 f"output's shape {out} (x's leading dims, then N), got {list(residual.shape)}")
    if bias is not None:
        torch._check(bias.dim() == 1, lambda: f"vlmkern.{_OP}: bias must be a 1-D tensor (N,), "
                     f"got {bias.dim()}-D of shape {list(bias.shape)}")
        _check_same(bias, x, "bias")
        torch._check(bias.shape[0] == n, lambda: f"vlmkern.{_OP}: bias has {bias.shape[0]} "
                     f"elements but weight has N={n} rows")
    return out


@torch.library.register_fake("vlmkern::gated_linear")
def _gated_linear_fake(x, weight, gate, residual, bias=None):
    return x.new_empty(_check(x, weight, gate, residual, bias))


@torch.library.register_fake("vlmkern::gated_linear_backward")
def _gated_linear_backward_fake(grad_out, x, weight, gate, bias, output_mask):
    _check(x, weight, gate, grad_out, bias)
    outs = (x, weight, gate, bias)
    return tuple(t.new_empty(t.shape) if on and t is not None else None
                 for on, t in zip(output_mask, outs, strict=True))


# ---- autograd ----------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    x, weight, gate, residual, bias = inputs
    ctx.save_for_backward(x, weight, gate, bias)


def _backward(ctx, grad: torch.Tensor):
    x, weight, gate, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2], bias is not None and need[4]]
    dx = dw = dgate = db = None
    if any(mask):
        dx, dw, dgate, db = torch.ops.vlmkern.gated_linear_backward(
            grad, x, weight, gate, bias, mask)
    return dx, dw, dgate, grad if need[3] else None, db


torch.library.register_autograd("vlmkern::gated_linear", _backward, setup_context=_setup_context)
register_autocast("gated_linear")
