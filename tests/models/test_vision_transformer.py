"""vlmkern.models CLIP / SigLIP vision towers vs HF's CLIPVisionModel / SiglipVisionModel: outputs
(last_hidden_state, hidden_states[i], pooler_output) in fp32 and bf16, gradients, strict state
dicts both ways, uint8 pixels, resized positions, torch.compile, bad inputs, CUDA bf16."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from projector_testing import assert_lowprec_tier, fp32_rel_err
from testing_utils import compile_recording, profiled_names, sync_points
from tower_testing import (
    assert_bf16_within_twice_hfs_error,
    assert_compiled_equals_eager,
    assert_gradients_match,
)

from vlmkern.models import vision_transformer as vt

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=28, patch_size=14)
# name: (HF model class, ours, HF config class, config overrides)
FAMILIES = {
    "clip": (T.CLIPVisionModel, vt.CLIPVisionTransformer, T.CLIPVisionConfig, {}),
    "clip-gelu": (T.CLIPVisionModel, vt.CLIPVisionTransformer, T.CLIPVisionConfig,
                  {"hidden_act": "gelu"}),
    "siglip": (T.SiglipVisionModel, vt.SiglipVisionTransformer, T.SiglipVisionConfig,
               {"vision_use_head": True}),
    "siglip-nohead": (T.SiglipVisionModel, vt.SiglipVisionTransformer, T.SiglipVisionConfig,
                      {"vision_use_head": False}),
}
MAIN = ["clip", "siglip", "siglip-nohead"]


def _config(name: str, **over):
    hf_cls, ours_cls, cfg_cls, kw = FAMILIES[name]
    return hf_cls, ours_cls, cfg_cls(**{**TINY, **kw, **over})


def _hf(name: str, **over) -> torch.nn.Module:
    """HF's tower, eval mode, its init perturbed (seeded) so no bias or norm is trivial."""
    hf_cls, _, cfg = _config(name, **over)
    hf = hf_cls(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def _has_pool(name: str) -> bool:
    return name != "siglip-nohead"


def _ours_outputs(ours, x, layers, **kw) -> dict:
    out = {"last": ours(x, **kw)}
    out.update({i: ours(x, feature_layer=i, **kw) for i in layers})
    if getattr(ours, "use_head", True):  # CLIP always pools
        out["pooled"] = ours.pool(out["last"])
    return out


def _hf_outputs(hf, x, layers, **kw) -> dict:
    o = hf(x, output_hidden_states=True, **kw)
    out = {"last": o.last_hidden_state}
    out.update({i: o.hidden_states[i] for i in layers})
    if o.pooler_output is not None:
        out["pooled"] = o.pooler_output
    return out


LAYERS = (0, 1, -2, 3, -1, -4)


@pytest.mark.parametrize("name", [*MAIN, "clip-gelu"])
def test_fp32_matches_hf(name, path):
    hf = _hf(name)
    ours = FAMILIES[name][1].from_hf(hf)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want, got = _hf_outputs(hf, x, LAYERS), _ours_outputs(ours, x, LAYERS)
        several = ours.hidden_states(x, LAYERS)  # one pass, the states in the order asked
    assert got.keys() == want.keys() and ("pooled" in want) == _has_pool(name)
    assert all(torch.equal(s, got[i]) for s, i in zip(several, LAYERS, strict=True))
    for key, ref in want.items():
        assert ref.abs().max() > 0 and got[key].shape == ref.shape, key
        assert fp32_rel_err(got[key], ref) <= 1e-5, key
    # hidden_states[i] are distinct (a wrong index cannot pass), HF's last_hidden_state is the
    # last layer's output for CLIP, its post_layernorm for SigLIP
    assert fp32_rel_err(want[-2], want[-1]) > 1e-2 and fp32_rel_err(want[0], want[1]) > 1e-2
    assert (fp32_rel_err(want["last"], want[-1]) == 0) == name.startswith("clip")


@pytest.mark.parametrize("name", MAIN)
def test_interpolated_positions_match_hf(name):
    hf = _hf(name)
    ours = FAMILIES[name][1].from_hf(hf)
    x = torch.randn(2, 3, 56, 42)  # 4 x 3 patches from a 2 x 2 position table
    with torch.no_grad():
        want = _hf_outputs(hf, x, (0, -2), interpolate_pos_encoding=True)
        got = _ours_outputs(ours, x, (0, -2), interpolate_pos_encoding=True)
    for key, ref in want.items():
        assert ref.abs().max() > 0
        assert fp32_rel_err(got[key], ref) <= 1e-5, key
    assert got["last"].shape[1] == 12 + name.startswith("clip")


@pytest.mark.parametrize("name", MAIN)
def test_uint8_pixels_equal_hf_on_normalized_pixels(name):
    hf = _hf(name)
    ours = FAMILIES[name][1].from_hf(hf, mean=MEAN, std=STD, rescale=1 / 255)
    u = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    x = (u / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    with torch.no_grad():
        want, got = _hf_outputs(hf, x, (-2,)), _ours_outputs(ours, u, (-2,))
    for key, ref in want.items():
        assert ref.abs().max() > 0
        assert fp32_rel_err(got[key], ref) <= 1e-5, key


@pytest.mark.parametrize("name", MAIN)
def test_state_dict_round_trip_both_ways(name):
    hf_cls, ours_cls, cfg = _config(name)
    hf = _hf(name)
    ours = ours_cls(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True)
    back = hf_cls(cfg).eval()
    back.load_state_dict(ours.state_dict(), strict=True)
    assert dict(ours.named_buffers()).keys() == dict(hf.named_buffers()).keys()
    for key, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], t), key
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ref = hf(x).last_hidden_state
        assert ref.abs().max() > 0 and torch.equal(back(x).last_hidden_state, ref)
        assert fp32_rel_err(ours.eval()(x), ref) <= 1e-5


def _wrapper(name: str, hf: torch.nn.Module) -> torch.nn.Module:
    """An HF model holding the tower as ``.vision_model``."""
    if name.startswith("clip"):
        wrapper = T.CLIPVisionModelWithProjection(hf.config)
    else:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, vocab_size=50)
        wrapper = T.SiglipModel(T.SiglipConfig(text_config=text,
                                               vision_config=hf.config.to_dict()))
    wrapper.vision_model.load_state_dict(hf.state_dict())
    return wrapper.eval()


@pytest.mark.parametrize("name", MAIN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hf_copies_weights_buffers_dtype_and_mode(name, dtype):
    hf = _hf(name).to(dtype)
    for source in (hf, _wrapper(name, hf).to(dtype)):
        ours = FAMILIES[name][1].from_hf(source)
        assert not ours.training
        for key, t in hf.state_dict().items():
            got = ours.state_dict()[key]
            assert got.dtype == t.dtype and torch.equal(got, t), key
            assert got.data_ptr() != t.data_ptr(), f"{key} is shared, not copied"
        for key, b in hf.named_buffers():
            assert torch.equal(ours.get_buffer(key), b), key
    assert FAMILIES[name][1].from_hf(hf.train()).training


@pytest.mark.parametrize("name", MAIN)
def test_bf16_within_twice_hfs_error(name, path):
    assert_bf16_within_twice_hfs_error(
        _hf(name), FAMILIES[name][1].from_hf, lambda m, x: _hf_outputs(m, x, (-2,)),
        lambda m, x: _ours_outputs(m, x, (-2,)), torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("name", MAIN)
def test_gradients_match_hf(name, path):
    hf = _hf(name)
    assert_gradients_match(hf, FAMILIES[name][1].from_hf(hf),
                           lambda m, x: _hf_outputs(m, x, (-2,)),
                           lambda m, x: _ours_outputs(m, x, (-2,)), torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("name", MAIN)
def test_compiled_fullgraph_equals_eager(name, path):
    """aot_eager traces the ops' fake kernels and autograd: forward and backward equal eager."""
    ours = FAMILIES[name][1].from_hf(_hf(name))
    x = torch.randn(2, 3, 28, 28)

    def run(pixels):
        return _ours_outputs(ours, pixels, (-2,))

    assert_compiled_equals_eager(run, x)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_at_most_two_graphs_without_host_reads(name, path):
    """G11: fullgraph over 4 batch sizes in <= 2 compilations, no host read in any graph."""
    ours = FAMILIES[name][1].from_hf(_hf(name))
    compiled, graphs = compile_recording(lambda x: ours.pooled(x))
    with torch.no_grad():
        for batch in (1, 2, 3, 5):
            compiled(torch.randn(batch, 3, 28, 28))
    assert 1 <= len(graphs) <= 2 and all(sync_points(g) == [] for g in graphs)
    kernels = [n for n in graphs[-1].graph.nodes if "cross_attention" in str(n.target)]
    # one per layer, and SigLIP's pooling head
    assert len(kernels) == (3 + (name == "siglip") if path == "kernel" else 0)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_hooked_mlp_runs_unfused_as_hf(name):
    """A forward hook on fc1 (as a PEFT adapter would wrap it) is not bypassed by the fused op."""
    hf = _hf(name)
    ours = FAMILIES[name][1].from_hf(hf)
    for model in (hf, ours):
        model.encoder.layers[1].mlp.fc1.register_forward_hook(lambda m, i, o: 2 * o)
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ref, plain = hf(x).last_hidden_state, FAMILIES[name][1].from_hf(hf)(x)
        assert fp32_rel_err(plain, ref) > 1e-2  # the hook changes the result
        assert fp32_rel_err(ours(x), ref) <= 1e-5


@pytest.mark.parametrize("name", MAIN)
def test_bad_inputs_raise_clear_errors(name):
    hf_cls, ours_cls, cfg = _config(name)
    ours = ours_cls(cfg)
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, H, W\)"):
        ours(torch.randn(1, 4, 28, 28))
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, H, W\)"):
        ours(torch.randn(3, 28, 28))
    for bad in (4, -5, 1.0, [1, 2]):
        with pytest.raises(ValueError, match=r"feature_layer must be None or an int in \[-4, 3\]"):
            ours(torch.randn(1, 3, 28, 28), feature_layer=bad)
    with pytest.raises(ValueError, match=r"activation 'relu' is not supported"):
        ours_cls(_config(name, hidden_act="relu")[2])
    duck = SimpleNamespace(**{**cfg.to_dict(), "num_attention_heads": 5})  # HF's would refuse
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        ours_cls(duck)
    if not _has_pool(name):
        with pytest.raises(ValueError, match="no pooling head"):
            ours.pooled(torch.randn(1, 3, 28, 28))
    if name == "clip":
        with pytest.raises(ValueError, match=r"doesn't match model"):
            ours(torch.randn(1, 3, 42, 28))


@pytest.mark.gpu
@pytest.mark.parametrize("name", MAIN)
@pytest.mark.parametrize("head_dim", [64, 72])  # CLIP-L's, SigLIP-so400m's
def test_cuda_bf16_within_twice_hfs_error(name, head_dim):
    """Head dims the CUDA cross_attention kernels take: they run (checked in the profile)."""
    hf = _hf(name, hidden_size=4 * head_dim, num_attention_heads=4, intermediate_size=512,
             image_size=56)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = _hf_outputs(copy.deepcopy(hf).double(), x.double(), (-2,))
        hf16 = hf.to("cuda", torch.bfloat16)
        xc = x.cuda()
        pt = _hf_outputs(hf16, xc, (-2,))
        ours = FAMILIES[name][1].from_hf(hf16)
        got = _ours_outputs(ours, xc, (-2,))
        names = profiled_names(lambda: ours.pooled(xc) if _has_pool(name) else ours(xc))
    assert any("cross_attention" in n for n in names)
    for key, r in ref.items():
        assert r.abs().max() > 0 and got[key].device.type == "cuda"
        assert_lowprec_tier(got[key], pt[key], r, what=str(key))
