"""The gated_linear bench's providers on a small CPU case agree with vlmkern.reference (the
rooflines compute something else on purpose and are only run), and its GPU cases are the
issue's Mllama o_proj / down_proj shapes."""

import torch

from vlmkern.bench import load
from vlmkern.bench.harness import Config, check_equal

bench = load("gated_linear")


def test_providers_agree_with_reference():
    cfg = Config("cpu", torch.float32, quick=True, compile=False)
    case = bench._case("tiny", 2, 5, 64, 48, cfg)
    inputs = case.make_inputs()
    ref = bench.reference()(*inputs)
    assert ref.abs().sum() > 0
    providers = bench.providers(cfg)
    for name, fn in providers.items():
        out = fn(*inputs)
        if name not in bench.ROOFLINES:
            check_equal(name, case, out, ref, exact=False)
    assert {"vlmkern", "vlmkern.aten", "torch"} <= set(providers)


def test_gpu_cases_are_mllama_shapes():
    shapes = [c.shape for c in bench.cases(Config("cuda", torch.bfloat16))]
    assert "mllama o_proj (1,4096,4096)->4096" in shapes
    assert "mllama down_proj (1,4096,14336)->4096" in shapes
    assert "mllama o_proj decode (1,1,4096)->4096" in shapes
