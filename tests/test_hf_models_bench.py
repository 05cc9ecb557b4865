"""The hf_models bench on its CPU cases: patched and HF models agree within the bench's gate, the
patched side really holds vlmkern modules, and every case asks for eager CUDA timing."""

import pytest
import torch

from vlmkern.bench import load
from vlmkern.bench.harness import Config, check_equal

pytest.importorskip("transformers")
bench = load("hf_models")


def test_cases_agree_and_are_patched():
    cfg = Config("cpu", torch.float32, quick=False, compile=False)
    cases = bench.cases(cfg)
    assert len(cases) == 4
    providers = bench.providers(cfg)
    for case in cases:
        assert not case.cuda_graph
        spec = case.kwargs["spec"]
        def ours(root):  # vlmkern modules below the root (a bench holder is vlmkern's too)
            return [m for m in list(root.modules())[1:]
                    if type(m).__module__.startswith("vlmkern.")]

        assert ours(spec.vk) and not ours(spec.hf), case.shape
        inputs = case.make_inputs()
        ref = bench.reference()(*inputs, **case.kwargs)
        assert ref.abs().sum() > 0
        for name, fn in providers.items():
            check_equal(name, case, fn(*inputs, **case.kwargs), ref, exact=False)
