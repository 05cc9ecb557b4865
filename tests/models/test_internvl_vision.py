"""vlmkern.models InternViT tower vs HF's InternVLVisionModel (InternViT-300M style: LayerNorm, no
qk-norm; 6B style: RMSNorm, qk-norm, no attention bias; a final LayerNorm without mean pooling):
last_hidden_state and hidden_states[i] in fp32 and bf16, resized positions, uint8 pixels,
gradients, strict state dicts both ways, torch.compile without host reads, a hooked MLP, bad
inputs, CUDA bf16 at InternViT's head dims."""

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

from vlmkern.models import InternVLVisionTransformer

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=28, patch_size=14)
VARIANTS = {
    "300m": dict(attention_bias=True),  # InternViT-300M's q / k / v have biases
    # qk-norm at HF's RMSNorm default eps (1e-6), not layer_norm_eps
    "6b": dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False, layer_norm_eps=1e-2),
    "final-norm": dict(use_mean_pooling=False, hidden_act="gelu_pytorch_tanh"),
}
LAYERS = (0, 1, -2, 3, -1, -4)


def _hf(variant: str, **over) -> torch.nn.Module:
    """HF's tower, eval mode, its init perturbed (seeded) so no norm, bias or layer scale is
    trivial (HF starts lambda at 0.1 everywhere and the CLS / positions at 0)."""
    hf = T.InternVLVisionModel(T.InternVLVisionConfig(**{**TINY, **VARIANTS[variant], **over}))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf.eval()


def _hf_outputs(hf, x, layers) -> dict:
    o = hf(x, output_hidden_states=True)
    return {"last": o.last_hidden_state, **{i: o.hidden_states[i] for i in layers}}


def _ours_outputs(ours, x, layers) -> dict:
    return {"last": ours(x), **{i: ours(x, feature_layer=i) for i in layers}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_matches_hf(variant, path):
    hf = _hf(variant)
    ours = InternVLVisionTransformer.from_hf(hf)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want, got = _hf_outputs(hf, x, LAYERS), _ours_outputs(ours, x, LAYERS)
    for key, ref in want.items():
        assert ref.abs().max() > 0 and got[key].shape == ref.shape == (2, 5, 32), key
        assert fp32_rel_err(got[key], ref) <= 1e-5, key
    # hidden_states[i] are distinct, so a wrong index cannot pass; the final LayerNorm is an
    # identity with mean pooling
    assert fp32_rel_err(want[-2], want[-1]) > 1e-2 and fp32_rel_err(want[0], want[1]) > 1e-2
    assert (fp32_rel_err(want["last"], want[-1]) == 0) == (variant != "final-norm")


@pytest.mark.parametrize("size", [(56, 56), (56, 42)])
def test_resized_positions_match_hf(size):
    """Other grids than the table's 2 x 2 (square, and not): HF resizes bicubically."""
    hf = _hf("300m")
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref, got = hf(x).last_hidden_state, InternVLVisionTransformer.from_hf(hf)(x)
    assert got.shape == ref.shape == (2, 1 + size[0] // 14 * size[1] // 14, 32)
    assert fp32_rel_err(got, ref) <= 1e-5


def test_uint8_pixels_equal_hf_on_normalized_pixels():
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # InternVL's processor
    hf = _hf("300m")
    ours = InternVLVisionTransformer.from_hf(hf, mean=mean, std=std, rescale=1 / 255)
    u = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    x = (u / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        ref = hf(x).last_hidden_state
        assert fp32_rel_err(ours(u), ref) <= 1e-5
    with pytest.raises(ValueError, match="uint8 pixels need"):
        InternVLVisionTransformer.from_hf(hf)(u)


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trip_both_ways(variant):
    hf = _hf(variant)
    ours = InternVLVisionTransformer(hf.config)
    ours.load_state_dict(hf.state_dict(), strict=True)
    back = T.InternVLVisionModel(hf.config).eval()
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], t), key
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ref = hf(x).last_hidden_state
        assert torch.equal(back(x).last_hidden_state, ref)
        assert fp32_rel_err(ours.eval()(x), ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hf_copies_weights_dtype_and_mode(dtype):
    hf = _hf("6b").to(dtype)
    ours = InternVLVisionTransformer.from_hf(hf)
    assert not ours.training
    for key, t in hf.state_dict().items():
        got = ours.state_dict()[key]
        assert got.dtype == t.dtype and torch.equal(got, t), key
        assert got.data_ptr() != t.data_ptr(), f"{key} is shared, not copied"
    assert InternVLVisionTransformer.from_hf(hf.train()).training


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_within_twice_hfs_error(variant, path):
    assert_bf16_within_twice_hfs_error(
        _hf(variant), InternVLVisionTransformer.from_hf, lambda m, x: _hf_outputs(m, x, (-2,)),
        lambda m, x: _ours_outputs(m, x, (-2,)), torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_match_hf(variant, path):
    hf = _hf(variant)
    assert_gradients_match(hf, InternVLVisionTransformer.from_hf(hf),
                           lambda m, x: _hf_outputs(m, x, (-2,)),
                           lambda m, x: _ours_outputs(m, x, (-2,)), torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("variant", ["300m", "6b"])
def test_compiled_fullgraph_equals_eager_without_host_reads(variant, path):
    """aot_eager traces the ops' fake kernels and autograd: forward and backward equal eager,
    in one graph with no host read."""
    ours = InternVLVisionTransformer.from_hf(_hf(variant))
    x = torch.randn(2, 3, 28, 28)

    def run(pixels):
        return _ours_outputs(ours, pixels, (-2,))

    compiled, graphs = compile_recording(run)
    assert_compiled_equals_eager(run, x)
    with torch.no_grad():
        compiled(x)
    assert len(graphs) == 1 and sync_points(graphs[0]) == []
    names = [str(n.target) for n in graphs[0].graph.nodes]
    # (3 + 2 layers) of attention and MLP, each MLP with its norm in one op
    assert sum("mlp_projector" in n for n in names) == 5
    assert sum("cross_attention" in n for n in names) == (5 if path == "kernel" else 0)


def test_hooked_mlp_runs_unfused_as_hf():
    """A forward hook on fc1 (as a PEFT adapter would wrap it) is not bypassed by the fused op."""
    hf = _hf("6b")
    ours = InternVLVisionTransformer.from_hf(hf)
    for model in (hf, ours):
        model.encoder.layer[1].mlp.fc1.register_forward_hook(lambda m, i, o: 2 * o)
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ref, plain = hf(x).last_hidden_state, InternVLVisionTransformer.from_hf(hf)(x)
        assert fp32_rel_err(plain, ref) > 1e-2  # the hook changes the result
        assert fp32_rel_err(ours(x), ref) <= 1e-5


def test_bad_inputs_raise_clear_errors():
    cfg = T.InternVLVisionConfig(**TINY)
    ours = InternVLVisionTransformer(cfg)
    for shape in ((1, 4, 28, 28), (3, 28, 28)):
        with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, H, W\)"):
            ours(torch.randn(shape))
    for bad in (4, -5, 1.0, [1, 2], True):
        with pytest.raises(ValueError, match=r"feature_layer must be None or an int in \[-4, 3\]"):
            ours(torch.randn(1, 3, 28, 28), feature_layer=bad)
    with pytest.raises(ValueError, match=r"activation 'relu' is not supported"):
        InternVLVisionTransformer(T.InternVLVisionConfig(**TINY, hidden_act="relu"))
    duck = SimpleNamespace(**{**cfg.to_dict(), "norm_type": "batch_norm"})
    with pytest.raises(ValueError, match="norm_type must be 'layer_norm' or 'rms_norm'"):
        InternVLVisionTransformer(duck)
    duck = SimpleNamespace(**{**cfg.to_dict(), "num_attention_heads": 5})  # HF's would refuse
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        InternVLVisionTransformer(duck)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["300m", "6b"])
@pytest.mark.parametrize("head_dim", [64, 128])  # InternViT-300M's, InternViT-6B's
def test_cuda_bf16_within_twice_hfs_error(variant, head_dim):
    """Head dims the CUDA cross_attention kernels take: they run (checked in the profile)."""
    hf = _hf(variant, hidden_size=4 * head_dim, intermediate_size=512, image_size=56)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = _hf_outputs(copy.deepcopy(hf).double(), x.double(), (-2,))
        hf16 = hf.to("cuda", torch.bfloat16)
        xc = x.cuda()
        pt = _hf_outputs(hf16, xc, (-2,))
        ours = InternVLVisionTransformer.from_hf(hf16)
        got = _ours_outputs(ours, xc, (-2,))
        names = profiled_names(lambda: ours(xc))
    assert any("cross_attention" in n for n in names)
    for key, r in ref.items():
        assert r.abs().max() > 0 and got[key].device.type == "cuda"
        assert_lowprec_tier(got[key], pt[key], r, what=str(key))
