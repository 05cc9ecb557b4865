"""The cross_attention bench's providers on small CPU cases: each one (SDPA backends with HF's
masks, HF eager, compiled FlexAttention with the block masks it builds) agrees with
vlmkern.reference on Mllama ranges (dead rows), a decode step, Q-Former shared queries, packed
segments and prefix-LM, so the GPU tables compare the same function."""

import os

import pytest
import torch

from vlmkern.bench import load
from vlmkern.bench.harness import Config, check_equal

bench = load("cross_attention")
CFG = Config("cpu", torch.float32, quick=True, compile=False)
CASES = {
    "mllama": lambda: bench._mllama_case(1, 8, 1, CFG),
    "mllama_one_image": lambda: bench._mllama_case(1, 8, 1, CFG, images=1),  # 1601 keys
    "mllama_unmasked": lambda: bench._mllama_case(1, 8, 1, CFG, masked=False),
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


def test_packed_sdpa_calls_are_4d(monkeypatch):
    """Every SDPA provider runs the packed segments as HF's Qwen2-VL does, 4-D (1, H, n, D)
    per segment: CUDA's flash / mem-efficient / cuDNN backends refuse 3-D (math only)."""
    sdpa, shapes = torch.nn.functional.scaled_dot_product_attention, []

    def recorder(q, k, v, *args, **kw):
        shapes.append(tuple(q.shape))
        return sdpa(q, k, v, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorder)
    case = CASES["packed"]()
    inputs = case.make_inputs()
    sdpa_providers = [n for n in bench.providers(CFG) if n.startswith("SDPA")]
    assert "SDPA" in sdpa_providers and "SDPA math" in sdpa_providers
    for name in sdpa_providers:
        shapes.clear()
        bench.providers(CFG)[name](*inputs, **case.kwargs)
        assert shapes == [(1, 16, n, 80) for n in (40, 24, 64)], name


@pytest.mark.parametrize("name", ["mllama", "packed", "prefix"])
def test_flex_attention_block_masks(name):
    """The masks the FlexAttention provider builds reproduce each visibility (compiled on CPU)."""
    case = CASES[name]()
    inputs = case.make_inputs()
    flex = bench.providers(Config("cpu", torch.float32, quick=True, compile=True))["FlexAttention"]
    out = flex(*inputs, **case.kwargs)
    check_equal("FlexAttention", case, out, bench.reference()(*inputs, **case.kwargs), exact=False)


def test_m128_provider(monkeypatch):
    """vlmkern.m128 (CUDA only in providers()): on the CPU the op ignores the switch, so this
    checks the wrapper: the reference's result on an Mllama prefill of 80 rows, the env var set
    during the call and restored after, ValueError (skipped by the harness) on the cases it does
    not take."""
    assert "vlmkern.m128" not in bench.providers(CFG)
    monkeypatch.setenv("VLMKERN_XATTN_BLOCK_M", "64")
    seen = []
    inner = bench.vlmkern_xattn

    def spy(*args, **kw):
        seen.append(os.environ["VLMKERN_XATTN_BLOCK_M"])
        return inner(*args, **kw)

    monkeypatch.setattr(bench, "vlmkern_xattn", spy)
    case = bench._mllama_case(1, 80, 1, CFG)
    inputs = case.make_inputs()
    out = bench.vlmkern_m128(*inputs, **case.kwargs)
    check_equal("vlmkern.m128", case, out, bench.reference()(*inputs, **case.kwargs), exact=False)
    assert seen == ["128"] and os.environ["VLMKERN_XATTN_BLOCK_M"] == "64"
    for name in ("decode", "qformer", "packed", "prefix"):
        c = CASES[name]()
        with pytest.raises(ValueError, match="no 128-row CTA|fit one 64-row CTA"):
            bench.vlmkern_m128(*c.make_inputs(), **c.kwargs)


def test_mllama_case_sizes_and_visible_work():
    """Key lengths 1601 (one image of one tile) and 3202; the unmasked case counts every pair."""
    one, two = bench._mllama_case(1, 8, 1, CFG, images=1), bench._mllama_case(1, 8, 1, CFG)
    plain = bench._mllama_case(1, 8, 1, CFG, masked=False)
    assert one.shape.endswith("L1601") and two.shape.endswith("L3202")
    assert plain.shape.endswith("L3202 unmasked") and plain.kwargs["spec"].kind == "plain"
    assert plain.flops == 4 * 128 * 32 * 8 * 3202 > two.flops  # 4 dead rows + half of the keys
