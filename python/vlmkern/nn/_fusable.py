"""When a vlmkern.nn module may hand its submodules' parameters to a fused op."""

from __future__ import annotations

from torch import nn


def fusable(*modules: nn.Module, types: tuple[type, ...] = (nn.Linear,)) -> bool:
    """Whether every module is exactly one of ``types`` with no forward or backward hooks (and none
    global), its class's own forward (accelerate's offloading hooks replace ``module.forward``) and
    plain nn.Parameter parameters: then a fused op reading their parameters computes what calling
    them would. A replaced module (a PEFT
    / LoRA wrapper, a quantized Linear), a hook or a patched forward fails this, and the caller
    runs the modules one by one (HF's math, unfused) or refuses, so nothing is bypassed."""
    g = nn.modules.module
    if (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
            or g._global_backward_pre_hooks):
        return False
    return all(type(m) in types and not m._forward_hooks and not m._forward_pre_hooks
               and not m._backward_hooks and not m._backward_pre_hooks
               and "forward" not in vars(m)
               # a tensor-subclass weight (torchao quantization, DTensor) is not a plain matrix
               and all(type(p) is nn.Parameter for p in m.parameters(recurse=False))
               for m in modules)
