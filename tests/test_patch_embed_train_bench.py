"""The patch_embed_train bench's providers on a small CPU image case agree with vlmkern.reference
differentiated in float32 (output and the weight / bias / position / CLS gradients; the roofline
computes something else on purpose and is only run); its cases are the image cases only."""

import torch

from vlmkern.bench import load
from vlmkern.bench.harness import Config, check_equal

bench = load("patch_embed_train")
fwd = load("patch_embed")


def test_providers_agree_with_reference():
    cfg = Config("cpu", torch.float32, quick=True, compile=False)
    case = fwd._image_case("tiny", 2, 28, 7, 40, True, True, cfg)  # bias and CLS
    inputs = case.make_inputs()
    ref = bench.reference()(*inputs)
    assert len(ref) == 5 and all(r.abs().sum() > 0 for r in ref)
    providers = bench.providers(cfg)
    for name, fn in providers.items():
        out = fn(*inputs)
        if name not in bench.ROOFLINES:
            check_equal(name, case, out, ref, exact=False)
    assert {"vlmkern", "HF conv", "unfold+linear"} <= set(providers)


def test_cases_are_image_cases():
    cases = bench.cases(Config("cpu", torch.bfloat16))
    assert cases and all("qwen" not in c.shape and not c.kwargs for c in cases)
    assert any(c.shape.startswith("clip-l14-336") for c in cases)
