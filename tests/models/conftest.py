"""Fixtures of the vlmkern.models tests."""

import pytest

from vlmkern.models import vision_transformer as vt


@pytest.fixture(params=["sdpa", "kernel"])
def path(request, monkeypatch):
    """Which CPU attention the CLIP / SigLIP-style towers run: torch SDPA (the default) or
    vlmkern.ops.cross_attention."""
    monkeypatch.setattr(vt, "CPU_KERNEL", request.param == "kernel")
    return request.param
