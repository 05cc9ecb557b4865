"""Drop-in vlmkern for Hugging Face transformers models: :func:`patch_model` swaps the HF modules it
knows (connectors, vision embeddings, Mllama's gated cross-attention layers) for vlmkern.nn modules
that hold the very same Parameter objects, and routes the Qwen2-VL family's RoPE functions through
vlmkern's kernels. :func:`unpatch_functions` undoes the function patches."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops.pixel_shuffle import pixel_shuffle
from ..ops.rope import apply_rotary_pos_emb, apply_rotary_pos_emb_vision
from .hf_builders import BUILDERS, Skip, builder_key

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


def _is_hf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _hooked(module: nn.Module) -> str | None:
    """Why a module tree cannot be rebuilt without changing behaviour (hooks, a replaced forward,
    e.g. accelerate's offloading), or None."""
    for name, m in module.named_modules():
        if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks):
            return f"{name or 'it'} has hooks"
        if "forward" in vars(m):
            return f"{name or 'it'} has a replaced forward"
    return None


def patch_model(model: nn.Module, *, connectors: bool = True, embeddings: bool = True,
                cross_attention: bool = True, vision_attention: bool = True,
                rope: bool = True) -> PatchReport:
    """Swap the HF modules of ``model`` that vlmkern implements, in place; returns a report.

    Each replacement is a ``vlmkern.nn`` module (or an adapter with HF's ``forward`` signature)
    holding HF's own Parameter and buffer objects: the state dict, ``model.parameters()``, an
    optimizer built before the call and tied weights are unchanged, and outputs match HF's
    (fp32 to rounding; bf16 / fp16 within the ops' tolerance rules). Covered:

    - ``connectors``: LLaVA / LLaVA-NeXT / -OneVision / -NeXT-Video projectors, InternVL's
      projector (and its pixel shuffle), Qwen2-VL / 2.5-VL / 3-VL mergers (DeepStack too),
      Idefics3 / SmolVLM connectors, PaliGemma's projector;
    - ``embeddings``: CLIP, SigLIP and InternViT vision embeddings, Qwen2-VL / 2.5-VL / 3-VL
      patch embeds;
    - ``cross_attention``: Mllama's ``MllamaCrossAttentionDecoderLayer`` (cross-attention with
      visible key ranges instead of the dense mask, both tanh gates fused into their GEMMs);
    - ``vision_attention``: the Qwen2-VL / 2.5-VL / 3-VL ViT attention (all image / window
      segments in one packed cross_attention, no host sync; Qwen3-VL-MoE too);
    - ``rope``: ``apply_rotary_pos_emb`` / ``apply_rotary_pos_emb_vision`` of the Qwen2-VL family's
      modeling modules used by ``model`` (a process-wide change, as any function patch; undo it
      with :func:`unpatch_functions`).

    A module with hooks or a replaced ``forward`` (accelerate offloading), or with parameters the
    vlmkern module lacks (a PEFT adapter), is left alone and listed in ``report.skipped``.
    """
    report = PatchReport()
    kinds = {"connector": connectors, "embedding": embeddings, "cross_attention": cross_attention,
             "vision_attention": vision_attention}
    _swap(model, "", model, kinds, report)
    if connectors:
        _patch_internvl_shuffle(model, report)
    if rope:
        _patch_rope(model, report)
    return report


def _swap(module: nn.Module, prefix: str, root: nn.Module, kinds: dict[str, bool],
          report: PatchReport) -> None:
    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        entry = BUILDERS.get(builder_key(child)) if _is_hf(child) else None
        if entry is not None and kinds[entry.kind]:
            new = _build(entry, child, root, path, report)
            if new is not None:
                setattr(module, name, new)
                report.replaced.append((path, type(child).__name__,
                                       f"{type(new).__module__}.{type(new).__qualname__}"))
                continue
        _swap(child, path, root, kinds, report)


def _build(entry, hf: nn.Module, root: nn.Module, path: str, report: PatchReport):
    why = _hooked(hf)
    try:
        if why is not None:
            raise Skip(why)
        with torch.device("meta"):
            new = entry.build(hf, root)
        _adopt(new, hf)
    except Skip as skip:
        report.skipped.append((path, type(hf).__name__, str(skip)))
        return None
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


class _InternVLPixelShuffle:
    """InternVLModel.pixel_shuffle(vision_features (B, H, W, C), scale_factor) as one vlmkern
    pixel_shuffle (the same channel order); other scale factors go to HF's method."""

    def __init__(self, hf_method) -> None:
        self.hf_method = hf_method

    def __call__(self, vision_features: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        r = round(1 / scale_factor)
        if r < 1 or r * scale_factor != 1:
            return self.hf_method(vision_features, scale_factor=scale_factor)
        return pixel_shuffle(vision_features, r)


def _patch_internvl_shuffle(model: nn.Module, report: PatchReport) -> None:
    for path, m in model.named_modules():
        if builder_key(m) == "modeling_internvl.InternVLModel" and _is_hf(m) \
                and "pixel_shuffle" not in vars(m):
            m.pixel_shuffle = _InternVLPixelShuffle(m.pixel_shuffle)
            report.functions.append(f"{path or '<root>'}.pixel_shuffle")


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
    """Give the HF modeling modules back the functions :func:`patch_model` replaced."""
    for (name, fn_name), fn in _originals.items():
        setattr(importlib.import_module(name), fn_name, fn)
    _originals.clear()
