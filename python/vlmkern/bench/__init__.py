"""Benchmarks behind `python -m vlmkern.bench <op|all>`: one module per op, registered here."""

from __future__ import annotations

import importlib
from types import ModuleType

# op name -> bench module (each defines NAME, BASELINE, EXACT, cases(cfg), providers(cfg),
# reference()); adding an op's bench is one line here. `all` runs them in this order: the ops
# whose CUDA paths have unmeasured variants first (a GPU call's time budget may cut the tail;
# the bandwidth-bound ops last were measured on 2026-11-22).
REGISTRY: dict[str, str] = {
    "cross_attention": "vlmkern.bench.cross_attention",
    "hf_models": "vlmkern.bench.hf_models",
    "patch_embed": "vlmkern.bench.patch_embed",
    "patch_embed_train": "vlmkern.bench.patch_embed_train",
    "gated_linear": "vlmkern.bench.gated_linear",
    "projector": "vlmkern.bench.projector",
    "projector_train": "vlmkern.bench.projector_train",
    "pixel_shuffle": "vlmkern.bench.pixel_shuffle",
    "rope": "vlmkern.bench.rope",
    "mrope_position_ids": "vlmkern.bench.mrope_position_ids",
    "vision_grid": "vlmkern.bench.vision_grid",
}


def load(name: str) -> ModuleType:
    """Import the bench module registered for op `name`."""
    if name not in REGISTRY:
        raise ValueError(f"unknown bench {name!r}; known: {', '.join(REGISTRY)} or 'all'")
    return importlib.import_module(REGISTRY[name])
