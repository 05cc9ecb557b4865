"""The patch_embed bench's providers on tiny CPU cases (image, raw uint8 pixels with CLIP's
normalization, Qwen2-VL / Qwen3-VL packed rows) agree with vlmkern.reference; the rooflines run
the same GEMM; the CPU case list has a uint8 row."""

import pytest
import torch

from vlmkern.bench import load
from vlmkern.bench.harness import Config, check_equal

bench = load("patch_embed")
CFG = Config("cpu", torch.float32, quick=True, compile=False)
CASES = {
    "image": lambda: bench._image_case("tiny", 2, 30, 7, 40, True, True, CFG),  # cropped 30 -> 28
    "uint8": lambda: bench._uint8_case("tiny", 2, 28, 7, 40, False, True, CFG),
    "qwen2": lambda: bench._packed_case("tiny", [(1, 4, 6), (2, 2, 4)], 4, 40, False, CFG),
    "qwen3": lambda: bench._packed_case("tiny", [(1, 4, 6), (1, 6, 2)], 4, 40, True, CFG),
}


@pytest.mark.parametrize("name", CASES)
def test_providers_agree_with_reference(name):
    case = CASES[name]()
    inputs = case.make_inputs()
    ref = bench.reference()(*inputs, **case.kwargs)
    assert ref.abs().sum() > 0
    ran = set()
    for pname, fn in bench.providers(CFG).items():
        out = fn(*inputs, **case.kwargs)
        if pname in bench.ROOFLINES:  # the bare GEMM: (tokens without CLS, D)
            assert out.shape[-1] == ref.shape[-1]
            continue
        check_equal(pname, case, out, ref, exact=False)
        ran.add(pname)
    assert {"vlmkern", "HF conv", "unfold+linear"} <= ran


def test_uint8_case_normalizes_for_the_peers_only():
    """vlmkern gets raw uint8 pixels (it folds the normalization); the peers' recipe normalizes
    first, so skipping that step is caught."""
    case = CASES["uint8"]()
    inputs = case.make_inputs()
    assert inputs[0].dtype == torch.uint8 and case.kwargs["norm"] == bench.CLIP_NORM
    ref = bench.reference()(*inputs, **case.kwargs)
    unnormalized = bench.unfold_linear_image(inputs[0].float(), *inputs[1:])
    assert (unnormalized - ref).abs().max() > 1


def test_cpu_cases_include_the_uint8_row():
    shapes = [c.shape for c in bench.cases(Config("cpu", torch.bfloat16))]
    assert any(s.startswith("clip-l14-336 uint8") for s in shapes)
    assert any(s.startswith("qwen3-vl") for s in shapes)
