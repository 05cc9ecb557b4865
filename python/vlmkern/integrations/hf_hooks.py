"""HF's own forward hooks on a module :func:`vlmkern.integrations.hf.patch_model` replaces, and how
they carry over: transformers' output-capturing hooks (``output_hidden_states`` /
``output_attentions``) and gradient checkpointing's input-grad hooks. Any other hook keeps the
module HF's."""

from __future__ import annotations

import weakref
from collections.abc import Callable

from torch import nn

_CAPTURE, _INPUT_GRAD = "output_capturing_hook", "make_inputs_require_grads"


def _kind(hook: Callable) -> str:
    return getattr(hook, "__name__", "")


def movable(hook: Callable) -> bool:
    """Whether a forward hook is one of HF's own, which move with the module."""
    return _kind(hook) in (_CAPTURE, _INPUT_GRAD)


def hook_moves(hf: nn.Module, new: nn.Module, skip: type[Exception]) -> list[tuple]:
    """(source hooks dict, hook id, hook, target module in ``new``) for HF's hooks: capturing
    hooks on the replaced module itself, input-grad hooks on the submodule of the same name.
    Capturing hooks inside it are dropped (attention weights: vlmkern's attention returns none,
    as HF's SDPA path). Raises ``skip`` for an input-grad hook without a counterpart."""
    moves = []
    for name, m in hf.named_modules():
        for hook_id, hook in m._forward_hooks.items():
            if _kind(hook) == _CAPTURE and name:
                continue
            try:
                moves.append((m._forward_hooks, hook_id, hook, new.get_submodule(name)))
            except AttributeError:
                raise skip(f"{name} has an input-grad hook and no counterpart here") from None
    return moves


def move_hook(root: nn.Module, source: dict, hook_id: int, hook: Callable,
              target: nn.Module) -> None:
    """Register ``hook`` on ``target`` under its old id, and point HF's stored handles of it
    (``_require_grads_hooks`` of the models under ``root``) at the new place, so that
    ``disable_input_require_grads`` still removes it."""
    target._forward_hooks[hook_id] = hook
    for m in root.modules():
        for handle in vars(m).get("_require_grads_hooks", None) or ():
            if handle.id == hook_id and handle.hooks_dict_ref() is source:
                handle.hooks_dict_ref = weakref.ref(target._forward_hooks)


def install_capture_hooks(model: nn.Module) -> None:
    """HF installs its output-capturing hooks by class, on a model's first capturing forward;
    install them now, on HF's classes, so that they move to the replacements. Only on (sub)models
    none of whose parts HF has hooked yet: installing over hooked parts would hook them twice.
    (These hooks are closures: like HF's model after a capturing forward, the patched model no
    longer pickles as a whole; its state dict does.)"""
    try:
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # an older transformers: nothing to install
        return

    def hooked(m: nn.Module) -> bool:
        return any(getattr(x, "_output_capturing_hooks_installed", False) for x in m.modules())

    def visit(m: nn.Module) -> None:
        if isinstance(m, PreTrainedModel) and not hooked(m):
            maybe_install_capturing_hooks(m)
            return
        for child in m.children():
            visit(child)

    visit(model)
