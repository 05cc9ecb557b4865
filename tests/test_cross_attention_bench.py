"""The cross_attention bench's providers on small CPU cases: each one (SDPA backends with HF's
masks, HF eager, compiled FlexAttention with the block masks it builds) agrees with
vlmkern.reference on Mllama ranges (dead rows), a decode step, Q-Former shared queries, packed
segments and prefix-LM, so the GPU tables compare the same function."""

import pytest
import torch

from vlmkern.bench import load
from vlmkern.bench.harness import Config, check_equal

bench = load("cross_attention")
CFG = Config("cpu", torch.float32, quick=True, compile=False)
CASES = {
    "mllama": lambda: bench._mllama_case(1, 8, 1, CFG),
    "decode": lambda: bench._mllama_decode_case(2, 1, CFG),
    "qformer": lambda: bench._qformer_case(2, CFG),
    "packed": lambda: bench._packed_case([40, 24, 64], CFG),
    "prefix": lambda: bench._prefix_case(2, 48, 20, CFG),
}


@pytest.mark.parametrize("name", CASES)
def test_providers_agree_with_reference(name):
    case = CASES[name]()
    inputs = case.make_inputs()
    ref = bench.reference()(*inputs, **case.kwargs)
    assert ref.abs().sum() > 0
    ran = 0
    for pname, fn in bench.providers(CFG).items():
        try:
            out = fn(*inputs, **case.kwargs)
        except NotImplementedError:  # e.g. HF eager has no packed path: the bench skips it too
            continue
        check_equal(pname, case, out, ref, exact=False)
        ran += 1
    assert ran >= 3


@pytest.mark.parametrize("name", ["mllama", "packed", "prefix"])
def test_flex_attention_block_masks(name):
    """The masks the FlexAttention provider builds reproduce each visibility (compiled on CPU)."""
    case = CASES[name]()
    inputs = case.make_inputs()
    flex = bench.providers(Config("cpu", torch.float32, quick=True, compile=True))["FlexAttention"]
    out = flex(*inputs, **case.kwargs)
    check_equal("FlexAttention", case, out, bench.reference()(*inputs, **case.kwargs), exact=False)
