"""When a vlmkern.nn module may hand its submodules' parameters to a fused op."""

from __future__ import annotations

from torch import nn


def input_grad_hooks(module: nn.Module) -> list:
    """HF's ``make_inputs_require_grads`` forward hooks on ``module`` (what
    ``enable_input_require_grads`` / gradient checkpointing put on a model's input embeddings:
    they only make the output require grad, so a fused op can run them on its own output)."""
    return [h for h in module._forward_hooks.values()
            if getattr(h, "__name__", "") == "make_inputs_require_grads"]


def fusable(*modules: nn.Module, types: tuple[type, ...] = (nn.Linear,),
            input_grad_hooks_ok: bool = False, global_hooks_ok: bool = False) -> bool:
    """Whether every module is exactly one of ``types`` with no forward or backward hooks (and none
    global), its class's own forward (accelerate's offloading hooks replace ``module.forward``) and
    plain nn.Parameter parameters: then a fused op reading their parameters computes what calling
    them would. A replaced module (a PEFT
    / LoRA wrapper, a quantized Linear), a hook or a patched forward fails this, and the caller
    runs the modules one by one (HF's math, unfused) or refuses, so nothing is bypassed. With
    ``input_grad_hooks_ok`` HF's input-grad hooks are allowed (the caller runs them itself); with
    ``global_hooks_ok`` global module hooks (FlopCounterMode's, ...) are too: they then see the
    fused module's call, not its submodules'."""
    g = nn.modules.module
    if not global_hooks_ok and (g._global_forward_hooks or g._global_forward_pre_hooks
                                or g._global_backward_hooks or g._global_backward_pre_hooks):
        return False
    return all(type(m) in types and not m._forward_pre_hooks
               and len(m._forward_hooks) == (len(input_grad_hooks(m)) if input_grad_hooks_ok else 0)
               and not m._backward_hooks and not m._backward_pre_hooks
               and "forward" not in vars(m)
               # a tensor-subclass weight (torchao quantization, DTensor) is not a plain matrix
               and all(type(p) is nn.Parameter for p in m.parameters(recurse=False))
               for m in modules)
