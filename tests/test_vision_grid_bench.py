"""The vision_grid bench: vlmkern's and transformers' index tensors agree on every case (HF's
cu_seqlens padded to the fixed length), and the cases cover windows and position-table taps."""

import pytest
import torch

from vlmkern.bench import load
from vlmkern.bench.harness import Config, check_equal

pytest.importorskip("transformers")
bench = load("vision_grid")


def test_providers_agree_on_every_case():
    cfg = Config("cpu", torch.float32)
    cases = bench.cases(cfg)
    assert {c.kwargs["model"] for c in cases} == {"qwen2_5_vl", "qwen3_vl"}
    for case in cases:
        inputs = case.make_inputs()
        ref = bench.reference()(*inputs, **case.kwargs)
        for name, fn in bench.providers(cfg).items():
            check_equal(name, case, fn(*inputs, **case.kwargs), ref, exact=True)
