"""vlmkern.nn connector modules against HF transformers' own modules: state dicts load unchanged
(strict), outputs match (fp32 ≤ 1e-5 relative; bf16 / fp16 ≤ 2× HF's own error vs fp64), and so do
the gradients of the input and every parameter (fp32 ≤ 2e-5; low precision 3×)."""

import copy

import pytest
import torch
from projector_testing import assert_lowprec_tier, fp32_rel_err

from vlmkern import nn as vnn

transformers = pytest.importorskip("transformers")
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector  # noqa: E402
from transformers.models.internvl.modeling_internvl import (  # noqa: E402
    InternVLModel,
    InternVLMultiModalProjector,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector  # noqa: E402
from transformers.models.paligemma.modeling_paligemma import (  # noqa: E402
    PaliGemmaMultiModalProjector,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger  # noqa: E402
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig  # noqa: E402
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchMerger  # noqa: E402
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector  # noqa: E402

C = 48  # vision hidden size
_V = {"hidden_size": C, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 1}
_T = {"hidden_size": 80, "num_attention_heads": 4, "num_key_value_heads": 4,
      "intermediate_size": 64, "num_hidden_layers": 1}  # fmt: skip


def _internvl_hf(hf):
    """HF's own pixel_shuffle (InternVLModel.pixel_shuffle does not use self), then projector."""

    def run(feats):
        b, n, c = feats.shape
        side = int((n - 1) ** 0.5)
        x = InternVLModel.pixel_shuffle(None, feats[:, 1:].reshape(b, side, side, c), 0.5)
        return hf(x.reshape(b, -1, x.shape[-1]))

    return run


def _build(name):
    """(hf module, our module, input maker (dtype -> x), hf call, our call)."""
    if name in ("llava", "llava_quick_gelu", "llava_no_bias"):
        act = "quick_gelu" if name == "llava_quick_gelu" else "gelu"
        cfg = transformers.LlavaConfig(
            vision_config={"model_type": "clip_vision_model", **_V},
            text_config={"model_type": "llama", **_T}, projector_hidden_act=act,
            multimodal_projector_bias=name != "llava_no_bias",
        )  # fmt: skip
        hf, ours = LlavaMultiModalProjector(cfg), vnn.LlavaMultiModalProjector.from_config(cfg)
        return hf, ours, lambda dt: torch.randn(2, 577, C, dtype=dt), hf, ours
    if name == "internvl":
        cfg = transformers.InternVLConfig(vision_config=_V,
                                          text_config={"model_type": "qwen2", **_T})  # fmt: skip
        hf = InternVLMultiModalProjector(cfg)
        ours = vnn.InternVLMultiModalProjector.from_config(cfg)
        return (hf, ours, lambda dt: torch.randn(2, 1 + 16 * 16, C, dtype=dt), _internvl_hf(hf),
                lambda feats: ours(feats[:, 1:], grid=(16, 16)))  # fmt: skip
    if name in ("qwen2_vl", "qwen2_5_vl"):
        hf_cls, ours_cls = {"qwen2_vl": (PatchMerger, vnn.Qwen2VLPatchMerger),
                            "qwen2_5_vl": (Qwen2_5_VLPatchMerger, vnn.Qwen2_5_VLPatchMerger)}[name]
        hf, ours = hf_cls(96, C, 2), ours_cls(96, C, 2)
        return hf, ours, lambda dt: torch.randn(4 * 97, C, dtype=dt), hf, ours
    if name.startswith("qwen3_vl"):
        post = name.endswith("deepstack")
        cfg = Qwen3VLVisionConfig(hidden_size=C, spatial_merge_size=2, out_hidden_size=96,
                                  num_heads=4)  # fmt: skip
        hf = Qwen3VLVisionPatchMerger(cfg, use_postshuffle_norm=post)
        ours = vnn.Qwen3VLVisionPatchMerger.from_config(cfg, use_postshuffle_norm=post)
        return hf, ours, lambda dt: torch.randn(4 * 97, C, dtype=dt), hf, ours
    if name in ("idefics3", "smolvlm", "smolvlm_r4"):
        cls, hf_cls, r = {"idefics3": (transformers.Idefics3Config, Idefics3Connector, 2),
                          "smolvlm": (transformers.SmolVLMConfig, SmolVLMConnector, 3),
                          "smolvlm_r4": (transformers.SmolVLMConfig, SmolVLMConnector, 4)}[name]
        cfg = cls(vision_config=_V, text_config=_T, scale_factor=r)
        hf, ours = hf_cls(cfg), vnn.Idefics3Connector.from_config(cfg)
        return hf, ours, lambda dt: torch.randn(2, (6 * r) ** 2, C, dtype=dt), hf, ours
    if name == "paligemma":
        cfg = transformers.PaliGemmaConfig(vision_config=_V, text_config=_T, projection_dim=64)
        hf = PaliGemmaMultiModalProjector(cfg)
        ours = vnn.PaliGemmaMultiModalProjector.from_config(cfg)
        return hf, ours, lambda dt: torch.randn(2, 256, C, dtype=dt), hf, ours
    raise AssertionError(name)


NAMES = ["llava", "llava_quick_gelu", "llava_no_bias", "internvl", "qwen2_vl", "qwen2_5_vl",
         "qwen3_vl", "qwen3_vl_deepstack", "idefics3", "smolvlm", "smolvlm_r4",
         "paligemma"]  # fmt: skip


def _loaded(name):
    hf, ours, make_x, hf_call, ours_call = _build(name)
    with torch.no_grad():  # norms start at ones / zeros: perturb so the test sees them
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours, make_x, hf_call, ours_call


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_match_hf(name):
    hf, ours, *_ = _build(name)
    assert list(ours.state_dict()) == list(hf.state_dict())
    for key, value in hf.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key


def _grads(module, call, x):
    module.zero_grad(set_to_none=True)
    leaf = x.detach().clone().requires_grad_()
    out = call(leaf)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    out.backward(g)
    grads = {"x": leaf.grad} | {n: p.grad for n, p in module.named_parameters()}
    return out.detach(), grads


@pytest.mark.parametrize("name", NAMES)
def test_fp32_matches_hf(name):
    hf, ours, make_x, hf_call, ours_call = _loaded(name)
    x = make_x(torch.float32)
    out, grads = _grads(ours, ours_call, x)
    hf_out, hf_grads = _grads(hf, hf_call, x)
    assert out.shape == hf_out.shape and hf_out.norm() > 0
    assert fp32_rel_err(out, hf_out) <= 1e-5
    for n, g in hf_grads.items():
        assert g.norm() > 0, n
        assert fp32_rel_err(grads[n], g) <= 2e-5, n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_lowprec_within_tiers_of_hf(name, dtype):
    hf, ours, make_x, hf_call, ours_call = _loaded(name)
    x = make_x(torch.float32).to(dtype)
    ref_out, ref_grads = _grads(hf.double(), hf_call, x.double())
    hf_out, hf_grads = _grads(hf.to(dtype), hf_call, x)
    ours.to(dtype)
    out, grads = _grads(ours, ours_call, x)
    assert out.dtype == dtype
    assert_lowprec_tier(out, hf_out, ref_out)
    for n, g in ref_grads.items():
        assert_lowprec_tier(grads[n], hf_grads[n], g, factor_=3.0, what=n)


def test_unsupported_activation_is_refused():
    with pytest.raises(ValueError, match=r"activation 'relu' is not supported"):
        vnn.LlavaMultiModalProjector(8, 8, act="relu")


def test_internvl_unfused_takes_shuffled_input_like_hf():
    cfg = transformers.InternVLConfig(vision_config=_V, text_config={"model_type": "qwen2", **_T})
    hf = InternVLMultiModalProjector(cfg)
    ours = vnn.InternVLMultiModalProjector.from_config(cfg, fuse_pixel_shuffle=False)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 64, 4 * C)
    assert fp32_rel_err(ours(x), hf(x)) <= 1e-5


def test_qwen_rmsnorm_module_matches_hf():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

    hf, ours = Qwen2_5_VLRMSNorm(C), vnn.QwenRMSNorm(C)
    with torch.no_grad():
        hf.weight.add_(torch.randn(C))
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(7, C, dtype=torch.bfloat16)
    assert torch.equal(ours.to(torch.bfloat16)(x), hf.to(torch.bfloat16)(x))


class _Lora(torch.nn.Module):
    """A PEFT-style wrapper: the base Linear plus a low-rank update."""

    def __init__(self, base, seed):
        super().__init__()
        self.base = base
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(4, base.in_features, generator=g) * 0.1)
        self.b = torch.nn.Parameter(torch.randn(base.out_features, 4, generator=g) * 0.1)

    def forward(self, x):
        return self.base(x) + x @ self.a.t() @ self.b.t()


def _wrap_linears(root, how):
    """Wraps every nn.Linear of root in _Lora ("lora"), hooks it ("hook") or patches its forward
    ("patched_forward"); same seeds per path, so HF's module and ours get the same change."""
    linears = [(n, m) for n, m in root.named_modules() if type(m) is torch.nn.Linear]
    for i, (path, lin) in enumerate(linears):
        if how == "hook":
            lin.register_forward_hook(lambda mod, inp, out: out * 1.5 + 0.25)
            continue
        if how == "patched_forward":  # as accelerate's offloading hooks replace module.forward
            lin.forward = (lambda f: lambda x: f(x) * 1.5 + 0.25)(lin.forward)
            continue
        parent_path, _, leaf = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        setattr(parent, leaf, _Lora(lin, seed=i))
    return len(linears)


@pytest.mark.parametrize("how", ["lora", "hook", "patched_forward"])
@pytest.mark.parametrize("name", NAMES)
def test_wrapped_or_hooked_linears_are_honoured(name, how):
    """The fused op reads the Linears' weights directly; a PEFT / LoRA-wrapped or hooked Linear
    must still take effect (the connector then runs its modules one by one, as HF does)."""
    hf, ours, make_x, hf_call, ours_call = _loaded(name)
    x = make_x(torch.float32)
    plain = ours_call(x).detach()
    assert _wrap_linears(hf, how) == _wrap_linears(ours, how) >= 1
    out, grads = _grads(ours, ours_call, x)
    hf_out, hf_grads = _grads(hf, hf_call, x)
    assert fp32_rel_err(plain, hf_out) > 1e-3  # the change is visible
    assert fp32_rel_err(out, hf_out) <= 1e-5
    for n, g in hf_grads.items():
        assert fp32_rel_err(grads[n], g) <= 2e-5, n


@pytest.mark.parametrize("name", ["llava", "internvl", "qwen2_5_vl"])
def test_compiles_without_graph_breaks(name):
    """G11 for the modules: the fusable() checks and the op trace in one graph."""
    _, ours, make_x, _, ours_call = _loaded(name)
    x = make_x(torch.float32)
    compiled = torch.compile(ours_call, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ours_call(x))


@pytest.mark.parametrize("name", ["llava", "internvl", "qwen2_vl", "idefics3"])
def test_under_autocast_within_tiers_of_hf(name):
    """Mixed-precision training: under torch.autocast (bf16) the connector runs in bf16 and stays
    within 2x of HF-under-autocast's own error against float64."""
    hf, ours, make_x, hf_call, ours_call = _loaded(name)
    x = make_x(torch.float32)
    hf64 = copy.deepcopy(hf).double()
    ref = (_internvl_hf(hf64) if name == "internvl" else hf64)(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, theirs = ours_call(x), hf_call(x)
    assert got.dtype == theirs.dtype
    e_ours = (got.double() - ref).abs().max().item()
    e_hf = (theirs.double() - ref).abs().max().item()
    assert e_ours <= 2 * e_hf + 1e-6 * ref.abs().max().item()
