"""Autocast rules for vlmkern's compute ops (cross_attention, mlp_projector, gated_linear,
patch_embed*): inside ``torch.autocast`` their floating-point inputs (float64 excepted, as autocast
does) on the region's device are cast to the region's dtype (``torch.get_autocast_dtype``, bf16 or
fp16 alike), then the op runs with autocast off, so its internal ATen calls are not autocast a
second time (without a rule they were, and the op mixed precisions). Outputs come back in that
dtype; autograd sees the casts, so fp32 parameters get fp32 gradients."""

from __future__ import annotations

import torch

_LIB = torch.library.Library("vlmkern", "IMPL")  # an IMPL fragment: kernels only, no new ops


def _cast(value, device: str, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        eligible = (value.is_floating_point() and value.dtype != torch.float64
                    and value.device.type == device)
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device, dtype) for v in value)
    return value


def register_autocast(op_name: str) -> None:
    """The rule above for ``torch.ops.vlmkern.<op_name>`` on the CPU and CUDA."""
    op = getattr(torch.ops.vlmkern, op_name).default
    for device, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):

        def kernel(*args, _device=device, **kwargs):
            dtype = torch.get_autocast_dtype(_device)
            cast = [_cast(a, _device, dtype) for a in args]
            cast_kw = {k: _cast(v, _device, dtype) for k, v in kwargs.items()}
            with torch.autocast(_device, enabled=False):
                return op(*cast, **cast_kw)

        _LIB.impl(op_name, kernel, key)
