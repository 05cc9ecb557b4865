"""vlmkern.nn.MRotary / VisionRotary: equal to the functional ops, built from HF configs, and equal
to HF's rotary-embedding module + apply function on real config defaults."""

import pytest
import torch

import vlmkern
from vlmkern.nn import MRotary, VisionRotary


def _rel(a, b):
    ref = b.double().abs().max()
    assert ref > 0
    return ((a.double() - b.double()).abs().max() / ref).item()


def test_mrotary_matches_functional_and_has_no_state():
    m = MRotary(64, [8, 12, 12], theta=1e4, interleaved=True)
    q, k = torch.randn(2, 4, 9, 64), torch.randn(2, 2, 9, 64)
    pos = torch.randint(0, 500, (3, 2, 9))
    out = m(q, k, pos)
    ref = vlmkern.ops.mrope(q, k, pos, [8, 12, 12], 1e4, interleaved=True)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert not list(m.parameters()) and not m.state_dict()
    assert "interleaved=True" in repr(m)


def test_vision_rotary_matches_functional():
    m = VisionRotary(80)
    q, k = torch.randn(50, 3, 80), torch.randn(50, 3, 80)
    pos = torch.randint(0, 40, (50, 2))
    out = m(q, k, pos)
    ref = vlmkern.ops.vision_rope(q, k, pos)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert "head_dim=80" in repr(m)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_mrotary_from_config_matches_hf(family):
    tf = pytest.importorskip("transformers")
    del tf
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl import modeling_qwen2_vl as hf
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig as Cfg

        rotary_cls = hf.Qwen2VLRotaryEmbedding
    else:
        from transformers.models.qwen3_vl import modeling_qwen3_vl as hf
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig as Cfg

        rotary_cls = hf.Qwen3VLTextRotaryEmbedding
    cfg = Cfg(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    q, k = torch.randn(2, 2, 33, 128), torch.randn(2, 1, 33, 128)
    pos = torch.randint(0, 3000, (3, 2, 33))
    cos, sin = rotary_cls(cfg)(q, pos)
    hf_q, hf_k = hf.apply_rotary_pos_emb(q, k, cos, sin)
    ours = MRotary.from_config(cfg)(q, k, pos)
    assert _rel(ours[0], hf_q) < 1e-6 and _rel(ours[1], hf_k) < 1e-6


def test_mrotary_from_config_rejects_other_rope_types():
    class Cfg:
        rope_parameters = {"rope_type": "yarn", "rope_theta": 1e6}
        head_dim = 128

    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        MRotary.from_config(Cfg())
