"""vlmkern.nn cross-attention modules vs HF transformers with identical weights (strict state-dict
load): MllamaTextCrossAttention and MllamaCrossAttentionDecoderLayer (HF's dense mask, both
masked-row behaviours, gradients incl. the gates), Blip2QFormerMultiHeadAttention /
Blip2QFormerAttention with learned queries broadcast over the batch."""

import copy

import pytest
import torch
from torch import nn
from xattn_testing import mllama_mask

import vlmkern

HIDDEN, HEADS, KV_HEADS, NVT, M, T = 128, 4, 2, 9, 2, 2
# Relative to max |HF|. HF's eager softmax runs in fp32 even for fp64 inputs (and its RMSNorm
# always normalizes in fp32): fp64 agrees to fp32 precision only.
TOL = {torch.float64: 1e-6, torch.float32: 2e-5, torch.bfloat16: 6e-2}


@pytest.fixture(scope="module")
def hf_mllama():
    pytest.importorskip("transformers", minversion="5.23")
    from transformers.models.mllama import configuration_mllama, modeling_mllama

    cfg = configuration_mllama.MllamaTextConfig(
        hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        intermediate_size=256, num_hidden_layers=1, cross_attention_layers=[0])
    cfg._attn_implementation = "eager"
    return cfg, modeling_mllama


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return module


def _mllama_inputs(dtype, B=2, S=40):
    mask = mllama_mask(B, S, M, T, seed=1)
    x = torch.randn(B, S, HIDDEN).to(dtype)
    states = torch.randn(B, M * T * NVT, HIDDEN).to(dtype)
    return mask, x, states


@pytest.mark.parametrize("masked_rows", ["uniform", "zero"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_mllama_cross_attention(hf_mllama, dtype, masked_rows):
    cfg, mod = hf_mllama
    hf = _randomize(mod.MllamaTextCrossAttention(cfg, layer_idx=0)).to(dtype)
    ours = vlmkern.nn.MllamaTextCrossAttention(cfg, layer_idx=0, masked_rows=masked_rows).to(dtype)
    ours.load_state_dict(hf.state_dict(), strict=True)
    mask, x, states = _mllama_inputs(dtype)
    add, row = mod._prepare_cross_attention_mask(mask, NVT, dtype)
    expected = hf(x, states, attention_mask=add)[0]
    if masked_rows == "zero":  # Meta: rows that see no image get no attention output
        expected = expected * row[:, 0]
    got = ours(x, states, kv_ranges=vlmkern.ops.mllama_kv_ranges(mask, NVT))
    assert (got.double() - expected.double()).abs().max() <= TOL[dtype] * expected.abs().max()
    assert row.eq(0).any()


@pytest.mark.parametrize("masked_rows", ["uniform", "zero"])
def test_mllama_decoder_layer_forward_backward(hf_mllama, masked_rows):
    cfg, mod = hf_mllama
    dt = torch.float64
    hf = _randomize(mod.MllamaCrossAttentionDecoderLayer(cfg, layer_idx=0)).to(dt)
    ours = vlmkern.nn.MllamaCrossAttentionDecoderLayer(cfg, masked_rows=masked_rows).to(dt)
    ours.load_state_dict(hf.state_dict(), strict=True)
    mask, x, states = _mllama_inputs(dt)
    add, row = mod._prepare_cross_attention_mask(mask, NVT, dt)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    if masked_rows == "uniform":
        expected = hf(x1, states, add, None, row)
    else:  # Meta's reference: the attention branch is zeroed too (transformers issue 39379)
        h = x1 + hf.cross_attn_attn_gate.tanh() * hf.cross_attn(
            hf.input_layernorm(x1), states, attention_mask=add)[0] * row[:, 0]
        mlp = hf.mlp(hf.post_attention_layernorm(h)) * row[:, 0]
        expected = h + hf.cross_attn_mlp_gate.tanh() * mlp
    got = ours(x2, states, kv_ranges=ours.kv_ranges(mask, NVT))
    assert (got - expected).abs().max() < 1e-6 * expected.abs().max()
    g = torch.randn_like(got)
    expected.backward(g)
    got.backward(g)
    assert (x1.grad - x2.grad).abs().max() < 1e-6 * x1.grad.abs().max()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = theirs[name].grad
        assert (p.grad - ref).abs().max() <= 1e-6 * ref.abs().max() + 1e-12, name
    assert ours.cross_attn_attn_gate.grad.abs().item() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mllama_decoder_layer_low_precision(hf_mllama, dtype):
    """G3(b) for the whole layer (gated_linear fuses both gated residual adds): error vs HF in
    float64 within 2x that of HF's own layer run in `dtype` (HF's masked-row behaviour)."""
    cfg, mod = hf_mllama
    hf = _randomize(mod.MllamaCrossAttentionDecoderLayer(cfg, layer_idx=0)).double()
    ours = vlmkern.nn.MllamaCrossAttentionDecoderLayer(cfg, masked_rows="uniform")
    ours.load_state_dict(hf.state_dict(), strict=True)
    ours = ours.to(dtype)
    mask, x, states = _mllama_inputs(torch.float64)

    def run_hf(layer, dt):
        add, row = mod._prepare_cross_attention_mask(mask, NVT, dt)
        return layer(x.to(dt), states.to(dt), add, None, row)

    ref = run_hf(hf, torch.float64)
    pt = run_hf(copy.deepcopy(hf).to(dtype), dtype)
    got = ours(x.to(dtype), states.to(dtype), kv_ranges=ours.kv_ranges(mask, NVT))
    e_ours = (got.double() - ref).abs().max().item()
    e_pt = (pt.double() - ref).abs().max().item()
    assert e_pt > 0
    assert e_ours <= 2 * e_pt + 1e-6 * ref.abs().max().item()


class _LoraLinear(nn.Module):
    """A PEFT-style wrapper: the base Linear plus a low-rank update B(A(x))."""

    def __init__(self, base: nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_b.weight)

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x))


@pytest.mark.parametrize("where", ["o_proj", "down_proj", "hook", "offset_hook", "attn_hook"])
def test_mllama_decoder_layer_respects_wrapped_projections(hf_mllama, where):
    """The fused gated_linear path reads o_proj / down_proj weights directly; a wrapped module
    (LoRA) or a forward hook must still take effect: the layer calls such modules as modules, with
    HF's math (the row mask on the MLP's output: an offset hook on down_proj would leak through
    masking the MLP's input instead)."""
    cfg, _ = hf_mllama
    layer = _randomize(vlmkern.nn.MllamaCrossAttentionDecoderLayer(cfg)).double()
    mask, x, states = _mllama_inputs(torch.float64)
    ranges = layer.kv_ranges(mask, NVT)
    plain = layer(x, states, kv_ranges=ranges)
    if where == "o_proj":
        layer.cross_attn.o_proj = _LoraLinear(layer.cross_attn.o_proj).double()
    elif where == "down_proj":
        layer.mlp.down_proj = _LoraLinear(layer.mlp.down_proj).double()
    elif where == "hook":
        layer.mlp.down_proj.register_forward_hook(lambda mod, inp, out: out * 2)
    elif where == "offset_hook":
        layer.mlp.down_proj.register_forward_hook(lambda mod, inp, out: out + 0.5)
    else:
        layer.cross_attn.register_forward_hook(lambda mod, inp, out: out * 2)
    changed = layer(x, states, kv_ranges=ranges)
    assert not torch.allclose(changed, plain)
    h = x + layer.cross_attn_attn_gate.tanh() * layer.cross_attn(
        layer.input_layernorm(x), states, kv_ranges=ranges)
    row = (ranges[..., 1] > ranges[..., 0]).any(-1, keepdim=True).to(h.dtype)
    mlp = layer.mlp(layer.post_attention_layernorm(h))
    expected = h + layer.cross_attn_mlp_gate.tanh() * (row * mlp)
    torch.testing.assert_close(changed, expected)


def test_mllama_cached_kv(hf_mllama):
    """K/V projected once (project_kv) and reused, as during decoding."""
    cfg, _ = hf_mllama
    ours = _randomize(vlmkern.nn.MllamaTextCrossAttention(cfg))
    mask, x, states = _mllama_inputs(torch.float32)
    ranges = vlmkern.ops.mllama_kv_ranges(mask, NVT)
    kv = ours.project_kv(states)
    step = ours(x[:, -1:], kv=kv, kv_ranges=ranges[:, -1:])
    full = ours(x, states, kv_ranges=ranges)
    assert (step - full[:, -1:]).abs().max() < 1e-5


def test_mllama_without_image_keys_raises():
    """Neither cross_attention_states nor kv: a ValueError naming them, not an AttributeError."""
    torch.manual_seed(0)
    kw = {"hidden_size": 64, "num_heads": 4, "num_kv_heads": 2}
    layer = vlmkern.nn.MllamaCrossAttentionDecoderLayer(intermediate_size=64, **kw)
    x, ranges = torch.randn(1, 5, 64), torch.zeros(1, 5, 1, 2, dtype=torch.int32)
    for module, name in ((layer, "MllamaCrossAttentionDecoderLayer"),
                         (vlmkern.nn.MllamaTextCrossAttention(**kw), "MllamaTextCrossAttention")):
        with pytest.raises(ValueError, match=rf"{name} needs cross_attention_states or kv="):
            module(x, kv_ranges=ranges)


@pytest.fixture(scope="module")
def hf_blip2():
    pytest.importorskip("transformers", minversion="5.23")
    from transformers.models.blip_2 import configuration_blip_2, modeling_blip_2

    cfg = configuration_blip_2.Blip2QFormerConfig(hidden_size=64, num_attention_heads=4,
                                                  encoder_hidden_size=48, intermediate_size=128)
    cfg._attn_implementation = "eager"
    return cfg, modeling_blip_2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", ["Blip2QFormerMultiHeadAttention", "Blip2QFormerAttention"])
def test_blip2_qformer(hf_blip2, cls, dtype):
    cfg, mod = hf_blip2
    hf = _randomize(getattr(mod, cls)(cfg, is_cross_attention=True)).to(dtype).eval()
    ours = getattr(vlmkern.nn, cls)(cfg, is_cross_attention=True).to(dtype)
    ours.load_state_dict(hf.state_dict(), strict=True)
    queries = torch.randn(1, 32, 64).to(dtype)  # learned query tokens
    images = torch.randn(6, 257, 48).to(dtype)
    expected = hf(queries.expand(6, -1, -1), encoder_hidden_states=images)
    expected = expected[0] if isinstance(expected, tuple) else expected
    got = ours(queries, images)  # queries projected once, broadcast with batch stride 0
    assert got.shape == expected.shape
    assert (got.double() - expected.double()).abs().max() <= TOL[dtype] * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cls", ["Blip2QFormerMultiHeadAttention", "Blip2QFormerAttention"])
def test_blip2_qformer_low_precision(hf_blip2, cls, dtype):
    """G3(b): error vs HF's module in float64 within 2x that of HF's own module run in `dtype`
    (the same weights and inputs, rounded to `dtype` first)."""
    cfg, mod = hf_blip2
    hf = _randomize(getattr(mod, cls)(cfg, is_cross_attention=True)).to(dtype).double().eval()
    ours = getattr(vlmkern.nn, cls)(cfg, is_cross_attention=True)
    ours.load_state_dict(hf.state_dict(), strict=True)
    ours = ours.to(dtype)
    queries = torch.randn(1, 32, 64).to(dtype).double()
    images = torch.randn(6, 257, 48).to(dtype).double()

    def run_hf(module, dt):
        out = module(queries.expand(6, -1, -1).to(dt), encoder_hidden_states=images.to(dt))
        return out[0] if isinstance(out, tuple) else out

    ref = run_hf(hf, torch.float64)
    pt = run_hf(copy.deepcopy(hf).to(dtype), dtype)
    got = ours(queries.to(dtype), images.to(dtype))
    e_ours = (got.double() - ref).abs().max().item()
    e_pt = (pt.double() - ref).abs().max().item()
    assert e_pt > 0
    assert e_ours <= 2 * e_pt + 1e-6 * ref.abs().max().item()


def test_blip2_self_attention(hf_blip2):
    cfg, mod = hf_blip2
    hf = _randomize(mod.Blip2QFormerMultiHeadAttention(cfg)).eval()
    ours = vlmkern.nn.Blip2QFormerMultiHeadAttention(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(3, 32, 64)
    assert (ours(x) - hf(x)[0]).abs().max() < 2e-5


def test_mllama_decoder_layer_compiles_without_graph_breaks(hf_mllama):
    cfg, _ = hf_mllama
    layer = _randomize(vlmkern.nn.MllamaCrossAttentionDecoderLayer(cfg))
    mask, x, states = _mllama_inputs(torch.float32)
    ranges = layer.kv_ranges(mask, NVT)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, states, kv_ranges=ranges),
                               layer(x, states, kv_ranges=ranges))


def test_mllama_decoder_layer_under_autocast_matches_hf(hf_mllama):
    """Mixed-precision training: under torch.autocast the layer keeps HF's fp32 residual stream
    (the gated adds leave the fused op) and stays as close to HF-in-fp64 as HF itself is."""
    cfg, mod = hf_mllama
    hf = _randomize(mod.MllamaCrossAttentionDecoderLayer(cfg, layer_idx=0))
    ours = vlmkern.nn.MllamaCrossAttentionDecoderLayer(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True)
    mask, x, states = _mllama_inputs(torch.float32)
    add, row = mod._prepare_cross_attention_mask(mask, NVT, torch.float32)
    ref = copy.deepcopy(hf).double()(x.double(), states.double(), add.double(), None,
                                      row.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = hf(x, states, add, None, row)
        got = ours(x, states, kv_ranges=ours.kv_ranges(mask, NVT))
    assert got.dtype == theirs.dtype == torch.float32
    e_ours, e_hf = ((t.double() - ref).abs().max().item() for t in (got, theirs))
    assert e_ours <= 2 * e_hf + 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize("masked_rows", ["uniform", "zero"])
def test_sdpa_fallback_matches_the_op(masked_rows):
    """The module's composite for CUDA inputs the kernels do not take (fp32, other head dims),
    checked on the CPU against the op: ranges with dead rows, GQA, both masked-row rules."""
    from vlmkern.nn.cross_attention import _sdpa_with_ranges

    b, s, hq, hk, d, m, t, n = 2, 9, 4, 2, 24, 2, 2, 5
    q = torch.randn(b, hq, s, d, dtype=torch.float64)
    k, v = (torch.randn(b, hk, m * t * n, d, dtype=torch.float64) for _ in range(2))
    ranges = vlmkern.ops.mllama_kv_ranges(mllama_mask(b, s, m, t), n)
    assert (ranges[..., 1] <= ranges[..., 0]).all(-1).any()  # some rows see nothing
    got = _sdpa_with_ranges(q, k, v, 0.3, ranges, masked_rows)
    want = vlmkern.ops.cross_attention(q.float(), k.float(), v.float(), scale=0.3,
                                       kv_ranges=ranges, masked_rows=masked_rows)
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)
