"""Fixtures of the op tests: `env`, the CUDA cross_attention's run-time switches."""

import pytest


@pytest.fixture
def env(monkeypatch):
    """env(name=value, ...) sets VLMKERN_XATTN_<NAME>; BLOCK_M, WARP_ROWS, SPLITS and
    IMAGES_PER_CTA start unset."""
    for name in ("BLOCK_M", "WARP_ROWS", "SPLITS", "IMAGES_PER_CTA"):
        monkeypatch.delenv(f"VLMKERN_XATTN_{name}", raising=False)

    def set_(**kw):
        for name, value in kw.items():
            monkeypatch.setenv(f"VLMKERN_XATTN_{name.upper()}", str(value))

    return set_
