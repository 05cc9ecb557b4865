"""Shared test setup: per-test seeding, the `device` fixture (cpu, cuda when present) and the
automatic skip of `gpu`-marked tests on machines without CUDA."""

import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Every test that takes `device` runs on the CPU and, marked `gpu`, on CUDA (skipped without it).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Run-time switches of the CUDA paths (README's table): cleared for every test, so an exported
# one cannot change which kernel a test exercises; tests that want one set it with monkeypatch.
RUNTIME_SWITCHES = (
    "VLMKERN_XATTN_BLOCK_M", "VLMKERN_XATTN_WARP_ROWS", "VLMKERN_XATTN_SPLITS",
    "VLMKERN_XATTN_IMAGES_PER_CTA",
    "VLMKERN_PROJECTOR_GEMM", "VLMKERN_PROJECTOR_SHUFFLE_NORM", "VLMKERN_PROJECTOR_SHUFFLE_GEMM",
    "VLMKERN_GATED_LINEAR", "VLMKERN_PATCH_EMBED_GEMM",
)


@pytest.fixture(autouse=True)
def _clear_runtime_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in RUNTIME_SWITCHES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Seed Python and torch (CPU and every CUDA device) so each test sees the same data."""
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param
