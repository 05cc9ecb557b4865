"""Benchmarks behind `python -m vlmkern.bench <op|all>`: one module per op, registered here."""

from __future__ import annotations

import importlib
from types import ModuleType

# op name -> bench module (each defines NAME, BASELINE, EXACT, cases(cfg), providers(cfg),
# reference()); adding an op's bench is one line here.
REGISTRY: dict[str, str] = {
    "pixel_shuffle": "vlmkern.bench.pixel_shuffle",
    "mrope_position_ids": "vlmkern.bench.mrope_position_ids",
    "rope": "vlmkern.bench.rope",
    "projector": "vlmkern.bench.projector",
    "projector_train": "vlmkern.bench.projector_train",
    "cross_attention": "vlmkern.bench.cross_attention",
    "gated_linear": "vlmkern.bench.gated_linear",
    "patch_embed": "vlmkern.bench.patch_embed",
}


def load(name: str) -> ModuleType:
    """Import the bench module registered for op `name`."""
    if name not in REGISTRY:
        raise ValueError(f"unknown bench {name!r}; known: {', '.join(REGISTRY)} or 'all'")
    return importlib.import_module(REGISTRY[name])
