"""The hf_models bench on its CPU cases: patched, vlmkern.models and HF models agree within the
bench's gate, the patched side really holds vlmkern modules, the vlmkern.models side is there
for the Qwen ViTs, LLaVA, InternVL and SmolVLM, and every case asks for eager CUDA timing."""

import pytest
import torch

from vlmkern.bench import load
from vlmkern.bench.harness import Config, check_equal

pytest.importorskip("transformers")
bench = load("hf_models")


def test_cases_agree_and_are_patched():
    cfg = Config("cpu", torch.float32, quick=False, compile=False)
    cases = bench.cases(cfg)
    assert len(cases) == 9
    providers = bench.providers(cfg)
    for case in cases:
        assert not case.cuda_graph
        spec = case.kwargs["spec"]
        def ours(root):  # vlmkern modules below the root (a bench holder is vlmkern's too)
            return [m for m in list(root.modules())[1:]
                    if type(m).__module__.startswith("vlmkern.")]

        assert not ours(spec.hf), case.shape
        # the drop-in patches every case but the Mllama tower's
        assert (spec.vk is None) == ("mllama vision" in case.shape), case.shape
        assert spec.vk is None or ours(spec.vk), case.shape
        inputs = case.make_inputs()
        ref = bench.reference()(*inputs, **case.kwargs)
        assert ref.abs().sum() > 0
        has_models = any(k in case.shape for k in ("vit", "llava", "internvl", "smolvlm",
                                                    "mllama vision"))
        assert (spec.models is not None) == has_models, case.shape
        for name, fn in providers.items():
            if name == "vlmkern.models" and not has_models:
                with pytest.raises(NotImplementedError, match="no vlmkern.models"):
                    fn(*inputs, **case.kwargs)
                continue
            if name == "vlmkern" and spec.vk is None:
                with pytest.raises(NotImplementedError, match="the drop-in replaces nothing"):
                    fn(*inputs, **case.kwargs)
                continue
            check_equal(name, case, fn(*inputs, **case.kwargs), ref, exact=False)


def test_gpu_sized_cases_build_and_patch():
    """The GPU cases' real widths (built on the meta device: no memory, no time) construct, and
    patch_model replaces what the bench compares."""
    cfg = Config("meta", torch.bfloat16)
    cases = [bench._qwen_vit("q2", "qwen2_vl", 8, 448, cfg),
             bench._qwen_vit("q25", "qwen2_5_vl", 1, 896, cfg),
             bench._llava("llava", 4, cfg), bench._internvl("internvl", 4, cfg),
             bench._smolvlm("smolvlm", 8, cfg), bench._mllama_vision("mllama vision", 2, cfg),
             bench._mllama("mllama", 1024, 4, cfg),
             bench._mllama("decode", 1, 4, cfg, decode_batch=16),
             bench._qformer("qformer", 64, cfg)]
    graph = bench._qwen_vit("q25 graph", "qwen2_5_vl", 1, 896, cfg, graph=True)
    assert graph.cuda_graph and not any(c.cuda_graph for c in cases)
    for case in [*cases, graph]:
        spec = case.kwargs["spec"]
        assert case.bytes_moved > 100e6, case.shape  # real widths: hundreds of MB of weights
        assert spec.vk is None or all(p.is_meta for p in spec.vk.parameters())
        if spec.models is not None:
            assert all(p.is_meta for p in spec.models.parameters())
