"""Drop-in vlmkern for Hugging Face transformers models: :func:`patch_model` swaps the HF modules it
knows (connectors, vision embeddings, ViT attention, Mllama's gated cross-attention layers, the
Q-Former attention) for vlmkern.nn modules that hold the very same Parameter objects, overrides
the Qwen models' ``get_rope_index``, hands the Qwen ViTs their index tensors (a pre-hook) and
routes the Qwen2-VL family's RoPE functions through vlmkern's kernels; :func:`unpatch_functions`
undoes the function, method and hook patches. Builders: hf_builders.py; HF's hooks: hf_hooks.py;
method overrides and the towers' pre-hook: hf_methods.py; adapters: hf_mllama.py, hf_qformer.py."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops.rope import apply_rotary_pos_emb, apply_rotary_pos_emb_vision
from .hf_builders import BUILDERS, Entry, Skip, builder_key, is_hf
from .hf_hooks import hook_moves, install_capture_hooks, movable, move_hook
from .hf_methods import patch_methods, unpatch_methods, vision_indices

__all__ = ["PatchReport", "patch_model", "unpatch_functions", "vision_indices"]

_ROPE_MODULES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
_ROPE_FUNCTIONS = {
    "apply_rotary_pos_emb": apply_rotary_pos_emb,
    "apply_rotary_pos_emb_vision": apply_rotary_pos_emb_vision,
}
_originals: dict[tuple[str, str], object] = {}  # (module, function) -> HF's function


@dataclass
class PatchReport:
    """What :func:`patch_model` did: ``replaced`` (path, HF class, vlmkern class), ``functions``
    (``module.function`` names now routed to vlmkern) and ``skipped`` (path, HF class, why)."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"vlmkern: {len(self.replaced)} modules replaced, "
                 f"{len(self.functions)} functions patched, {len(self.skipped)} skipped"]
        lines += [f"  {p or '<root>'}: {hf} -> {vk}" for p, hf, vk in self.replaced]
        lines += [f"  function {f}" for f in self.functions]
        lines += [f"  skipped {p or '<root>'} ({hf}): {why}" for p, hf, why in self.skipped]
        return "\n".join(lines)


_TORCH_LEAVES = (nn.Linear, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.Embedding)


def _unmovable(module: nn.Module) -> str | None:
    """Why a module tree cannot be rebuilt without changing behaviour, or None: hooks other than
    HF's own (user hooks, accelerate's offloading, which also replaces forward), a replaced
    forward, a module or parameter type vlmkern would not run the same way (a Linear subclass, a
    quantized layer, a tensor-subclass weight)."""
    for name, m in module.named_modules():
        where = name or "it"
        if (m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or not all(movable(h) for h in m._forward_hooks.values())):
            return f"{where} has hooks"
        if "forward" in vars(m):
            return f"{where} has a replaced forward"
        if (any(True for _ in m.parameters(recurse=False)) and type(m) not in _TORCH_LEAVES
                and not type(m).__module__.startswith("transformers.models.")):
            return f"{where} is a {type(m).__module__}.{type(m).__name__}"
    for name, p in module.named_parameters():
        if type(p) is not nn.Parameter:
            return f"parameter {name} is a {type(p).__name__}"
    return None


def patch_model(model: nn.Module, *, connectors: bool = True, embeddings: bool = True,
                cross_attention: bool = True, vision_attention: bool = True,
                rope: bool = True) -> PatchReport:
    """Swap the HF modules of ``model`` that vlmkern implements, in place; returns a report.

    Each replacement is a ``vlmkern.nn`` module (or an adapter with HF's ``forward`` signature)
    holding HF's own Parameter and buffer objects: the state dict, ``model.parameters()``, an
    optimizer built before the call, tied weights and ``save_pretrained`` are unchanged, and
    outputs match HF's (fp32 to rounding; bf16 / fp16 within the ops' tolerance rules). The
    switches (the README lists the families each covers):

    - ``connectors``: the LLaVA family's, InternVL's (and its pixel shuffle), the Qwen mergers
      (DeepStack too), Idefics3 / SmolVLM's and PaliGemma's projectors;
    - ``embeddings``: CLIP, SigLIP, InternViT and BLIP-family vision embeddings, the Qwen /
      Qwen2.5-Omni / GLM-4.1V patch convs;
    - ``cross_attention``: Mllama's ``MllamaCrossAttentionDecoderLayer`` (cross-attention on
      visible key ranges read from HF's dense mask, both tanh gates fused into their GEMMs) and
      the BLIP-2 / InstructBLIP(-Video) Q-Former attention (HF's function for padding masks,
      training dropout and fp32 on CUDA);
    - ``vision_attention``: the Qwen / Qwen2.5-Omni / GLM-4.1V ViT attention (every image or
      window segment in one packed cross_attention, no host sync), and a pre-hook on the Qwen
      towers handing HF's forward its index tensors (:func:`vision_indices`);
    - ``rope``: ``apply_rotary_pos_emb`` / ``apply_rotary_pos_emb_vision`` of the Qwen2-VL family's
      modeling modules used by ``model`` (a process-wide change, as any function patch; undo it
      with :func:`unpatch_functions`), and the Qwen models' ``get_rope_index`` (M-RoPE positions
      by one device op instead of HF's Python loop with host syncs; on this model only).

    Left alone and listed in ``report.skipped``: a module with hooks other than HF's own or a
    replaced ``forward`` (accelerate offloading), with parameters the vlmkern module lacks (a
    PEFT adapter), with a Linear subclass / quantized layer / tensor-subclass weight, with
    attention dropout, Mllama layers under eager attention, and ViT attention under flash
    attention (HF's varlen path is one call already). HF's own hooks move with a
    replaced module: ``output_hidden_states`` still sees every layer, and gradient
    checkpointing's input-grad hook still fires (enabled before or after the patch). Replaced
    attention returns no attention weights (nor does HF's SDPA path).
    """
    report = PatchReport()
    kinds = {"connector": connectors, "embedding": embeddings, "cross_attention": cross_attention,
             "vision_attention": vision_attention}
    if any(_entry(m, kinds) for m in model.modules()):
        install_capture_hooks(model)  # only when a module may be replaced (they do not pickle)
    _swap(model, "", model, kinds, report)
    report.functions += patch_methods(model, shuffle=connectors, rope_index=rope,
                                      indices=vision_attention)
    if rope:
        _patch_rope(model, report)
    return report


def _entry(module: nn.Module, kinds: dict[str, bool]) -> Entry | None:
    """The builder of an HF module vlmkern replaces under the switches ``kinds``, or None."""
    entry = BUILDERS.get(builder_key(module)) if is_hf(module) else None
    return entry if entry is not None and kinds[entry.kind] else None


def _swap(module: nn.Module, prefix: str, root: nn.Module, kinds: dict[str, bool],
          report: PatchReport) -> None:
    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        entry = _entry(child, kinds)
        if entry is not None:
            new = _build(entry, child, root, path, report)
            if new is not None:
                setattr(module, name, new)
                report.replaced.append((path, type(child).__name__,
                                       f"{type(new).__module__}.{type(new).__qualname__}"))
                continue
        _swap(child, path, root, kinds, report)


def _build(entry, hf: nn.Module, root: nn.Module, path: str, report: PatchReport):
    why = _unmovable(hf)
    try:
        if why is not None:
            raise Skip(why)
        with torch.device("meta"):
            new = entry.build(hf, root)
        moves = hook_moves(hf, new, Skip)
        _adopt(new, hf)
    except Skip as skip:
        report.skipped.append((path, type(hf).__name__, str(skip)))
        return None
    for move in moves:
        move_hook(root, *move)
    # HF's checkpointing switch (set by model.gradient_checkpointing_enable) carries over.
    for attr in ("gradient_checkpointing", "_gradient_checkpointing_func"):
        if attr in vars(hf):
            setattr(new, attr, vars(hf)[attr])
    return new.train(hf.training)


def _adopt(new: nn.Module, hf: nn.Module) -> None:
    """Give ``new`` (built on the meta device) HF's Parameter and buffer objects, name by name;
    both must hold the same names."""
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    theirs.update(hf.named_buffers(remove_duplicate=False))
    ours = dict(new.named_parameters(remove_duplicate=False))
    ours.update(new.named_buffers(remove_duplicate=False))
    if set(ours) != set(theirs):
        extra = sorted(set(theirs) - set(ours))
        missing = sorted(set(ours) - set(theirs))
        raise Skip(f"parameters differ (HF only: {extra}, vlmkern only: {missing})")
    for name, tensor in theirs.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = new.get_submodule(owner_path)
        slots = owner._parameters if leaf in owner._parameters else owner._buffers
        if isinstance(tensor, nn.Parameter) != (slots is owner._parameters):
            raise Skip(f"{name} is a parameter in one module and a buffer in the other")
        if ours[name].shape != tensor.shape:
            raise Skip(f"{name} is {tuple(tensor.shape)} in HF, {tuple(ours[name].shape)} here")
        slots[leaf] = tensor


def _patch_rope(model: nn.Module, report: PatchReport) -> None:
    used = {type(m).__module__ for m in model.modules()}
    for short in _ROPE_MODULES:
        name = f"transformers.models.{short}.modeling_{short}"
        if name not in used:
            continue
        mod = importlib.import_module(name)
        for fn_name, fn in _ROPE_FUNCTIONS.items():
            if not hasattr(mod, fn_name):
                continue
            _originals.setdefault((name, fn_name), getattr(mod, fn_name))
            setattr(mod, fn_name, fn)
            report.functions.append(f"{name}.{fn_name}")


def unpatch_functions() -> None:
    """Give the HF modeling modules back the functions :func:`patch_model` replaced, and the
    models their own methods (pixel_shuffle, get_rope_index) and vision towers' index
    computation (the pre-hooks go); replaced modules stay vlmkern's."""
    for (name, fn_name), fn in _originals.items():
        setattr(importlib.import_module(name), fn_name, fn)
    _originals.clear()
    unpatch_methods()
