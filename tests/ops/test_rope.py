"""RoPE forward (rope, vision_rope, mrope, mrope_): parity with HF transformers 5.23 (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL text and vision), agreement with the float64 reference on every shape,
layout, head dim and partial rotary, fuzzing, and the CUDA-only checks (auto-skipped without a
GPU). Autograd, opcheck, compile, CUDA graphs/streams/determinism and bad inputs:
test_rope_checks.py."""

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testing_utils import FLOATS, assert_bit_equal, assert_nontrivial

import vlmkern
from vlmkern import reference

rope_op = torch.ops.vlmkern.rope

KINDS = ["rope", "mrope", "mrope_il", "vision"]  # mrope_il: interleaved (Qwen3-VL)
MEMORIES = ["contiguous", "fused", "transposed", "strided_d", "offset"]
# (kind, layout) pairs the public API accepts; vision_rope takes packed (N, H, D) only.
KIND_LAYOUTS = [(k, lay) for k in KINDS[:3] for lay in ("bhsd", "bshd", "packed")]
KIND_LAYOUTS.append(("vision", "packed"))


# --- inputs ---------------------------------------------------------------------------------------


def _shape(layout, B, S, H, D):
    return {"bhsd": (B, H, S, D), "bshd": (B, S, H, D), "packed": (B * S, H, D)}[layout]


def _randn(shape, dtype, device):
    return torch.randn(shape, device=device).to(dtype)


def _alloc(layout, memory, B, S, H, D, dtype, device):
    """One randn tensor in the caller's layout, laid out in memory as `memory` says."""
    shape = _shape(layout, B, S, H, D)
    if memory == "contiguous":
        return _randn(shape, dtype, device)
    if memory == "transposed":  # bhsd as attention layers make it: (B, S, H, D).transpose(1, 2)
        if layout == "packed":
            return _randn((H, B * S, D), dtype, device).transpose(0, 1)
        other = _shape("bshd" if layout == "bhsd" else "bhsd", B, S, H, D)
        return _randn(other, dtype, device).transpose(1, 2)
    if memory == "strided_d":  # stride-2 head dim
        return _randn((*shape[:-1], 2 * D), dtype, device)[..., ::2]
    if memory == "offset":  # storage offset of one element (misaligned for vector loads)
        return _randn((math.prod(shape) + 1,), dtype, device)[1:].view(shape)
    raise AssertionError(memory)


def make_qk(layout, memory, B, S, Hq, Hk, D, dtype, device="cpu"):
    """q (Hq heads) and k (Hk heads) in `layout`; "fused" slices both out of one qkv projection."""
    if memory != "fused":
        return (_alloc(layout, memory, B, S, Hq, D, dtype, device),
                _alloc(layout, memory, B, S, Hk, D, dtype, device))
    qkv = _randn((B, S, Hq + 2 * Hk, D), dtype, device)
    q, k = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hk]
    if layout == "bhsd":
        return q.transpose(1, 2), k.transpose(1, 2)
    if layout == "packed":
        return q.flatten(0, 1), k.flatten(0, 1)
    return q, k


def _dense(t):
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


def make_positions(kind, layout, B, S, max_pos, dtype=torch.int64, device="cpu"):
    """Random ids in [0, max_pos): vision (N, 2); rope (B, S) / (N,); mrope (3, B, S) / (3, N)."""
    packed = layout == "packed"
    shape = {"vision": (B * S, 2), "rope": (B * S,) if packed else (B, S)}.get(
        kind, (3, B * S) if packed else (3, B, S)
    )
    return torch.randint(0, max_pos, shape, dtype=dtype).to(device)


def section(kind, half):
    """An mrope_section over `half` frequencies shaped like Qwen's ([16,24,24], [24,20,20])."""
    if kind == "mrope":
        hw = 3 * half // 8
        return [half - 2 * hw, hw, hw]
    hw = max(0, (half - 4) // 3)
    return [half - 2 * hw, hw, hw]


def apply(mod, kind, q, k, pos, layout="bhsd", rotary_dim=None, scale=1.0, **kw):
    """Runs `kind` from vlmkern.ops or vlmkern.reference (kw: compute_dtype for the reference)."""
    if kind == "vision":
        return mod.vision_rope(q, k, pos, **kw)
    if kind == "rope":
        return mod.rope(q, k, pos, 10000.0, rotary_dim, layout, scale, **kw)
    half = (rotary_dim or q.shape[-1]) // 2
    return mod.mrope(q, k, pos, section(kind, half), theta=1e6, interleaved=kind == "mrope_il",
                     rotary_dim=rotary_dim, layout=layout, scale=scale, **kw)


# --- tolerances -----------------------------------------------------------------------------------


def rel_err(out, ref):
    """max |out − ref| / max |ref| in float64."""
    ref = ref.detach().cpu().double()
    return ((out.detach().cpu().double() - ref).abs().max() / ref.abs().max()).item()


def assert_g3(out, ref64, out_pt, factor=2.0):
    """G3(b): max|out − ref64| ≤ factor·max|out_pt − ref64| + floor, where the floor (one ulp of
    the largest |ref64|) is what rounding the exact result to out's dtype may cost."""
    ref64 = ref64.detach().cpu().double()
    err = (out.detach().cpu().double() - ref64).abs().max().item()
    err_pt = (out_pt.detach().cpu().double() - ref64).abs().max().item()
    floor = torch.finfo(out.dtype).eps * ref64.abs().max().item()
    assert err <= factor * err_pt + floor, f"err {err:.3g} vs plain PyTorch {err_pt:.3g}"


def check(out, ref64, out_pt=None, factor=2.0):
    """out (any float dtype) against the float64 reference: relative 1e-6 for fp32 and fp64
    (cos/sin are fp32 in both, and two accurate fp32 cosf may differ by an ulp); fp16/bf16 are
    rounded once from fp32 math, so within one ulp of the reference per element, and meet the
    G3 rule against the plain-PyTorch low-precision result `out_pt`."""
    assert out.shape == ref64.shape
    if out.numel() == 0:
        return
    assert_nontrivial(ref64)
    o, r = out.detach().cpu().double(), ref64.detach().cpu().double()
    top = r.abs().max().item()
    if out.dtype in (torch.float32, torch.float64):
        assert (o - r).abs().max().item() <= 1e-6 * top, f"rel err {rel_err(o, r):.3g}"
        return
    bound = torch.finfo(out.dtype).eps * r.abs() + 1e-6 * top
    bad = (o - r).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} elements off by > 1 ulp, first {bad.nonzero()[0]}"
    if out_pt is not None:
        assert_g3(out, r, out_pt, factor)


def check_kind(kind, outs, q, k, pos, layout="bhsd", rotary_dim=None, scale=1.0):
    """check() both outputs of `kind` against the reference (float64 and plain low precision)."""
    qc, kc, pc = q.detach().cpu(), k.detach().cpu(), pos.cpu()
    ref64 = apply(reference, kind, qc.double(), kc.double(), pc, layout, rotary_dim, scale)
    lowp = q.dtype in (torch.float16, torch.bfloat16)
    pt = (apply(reference, kind, qc, kc, pc, layout, rotary_dim, scale, compute_dtype=None)
          if lowp else (None, None))
    for out, r, p in zip(outs, ref64, pt, strict=True):
        assert out.shape == r.shape and out.device == q.device
        check(out, r, p)
    rot = rotary_dim or q.shape[-1]
    for out, x in zip(outs, (q, k), strict=True):  # partial rotary: the rest is passed through
        assert_bit_equal(out[..., rot:], x[..., rot:])
    return ref64


# --- HF transformers parity -----------------------------------------------------------------------

HF_TEXT = {  # model: (config class, rotary class, mrope_section, theta, interleaved, heads)
    "qwen2_vl": ("Qwen2VLTextConfig", "Qwen2VLRotaryEmbedding", [16, 24, 24], 1e6, False, (28, 4)),
    "qwen2_5_vl": ("Qwen2_5_VLTextConfig", "Qwen2_5_VLRotaryEmbedding", [16, 24, 24], 1e6, False,
                   (28, 4)),
    "qwen3_vl": ("Qwen3VLTextConfig", "Qwen3VLTextRotaryEmbedding", [24, 20, 20], 5e6, True,
                 (32, 8)),
}
HF_VISION = {  # model: (config class, rotary class, config kwargs giving the head dim)
    "qwen2_vl": ("Qwen2VLVisionConfig", "Qwen2VLVisionRotaryEmbedding",
                 {"embed_dim": 1280, "num_heads": 16}),  # hd 80
    "qwen2_5_vl": ("Qwen2_5_VLVisionConfig", "Qwen2_5_VLVisionRotaryEmbedding",
                   {"hidden_size": 1280, "num_heads": 16}),  # hd 80
    "qwen3_vl": ("Qwen3VLVisionConfig", "Qwen3VLVisionRotaryEmbedding",
                 {"hidden_size": 1152, "num_heads": 16}),  # hd 72
}


@pytest.fixture(scope="module")
def hf():
    """name -> (configuration module, modeling module) of transformers' Qwen VL models."""
    pytest.importorskip("transformers", minversion="5.23")
    mods = {}
    for name in HF_TEXT:
        mods[name] = tuple(importlib.import_module(f"transformers.models.{name}.{part}_{name}")
                           for part in ("configuration", "modeling"))
    return mods


def hf_text(hf, model, heads):
    """HF's text rotary module (tiny config, no weights) and its apply_rotary_pos_emb."""
    cfg_cls, emb_cls, sec, theta, interleaved, _ = HF_TEXT[model]
    conf_mod, mod = hf[model]
    rope_parameters = {"rope_type": "default", "mrope_section": sec, "rope_theta": theta}
    if interleaved:
        rope_parameters["mrope_interleaved"] = True
    cfg = getattr(conf_mod, cfg_cls)(
        hidden_size=128 * heads[0], num_attention_heads=heads[0], num_key_value_heads=heads[1],
        head_dim=128, num_hidden_layers=1, rope_parameters=rope_parameters,
    )
    return getattr(mod, emb_cls)(cfg), mod.apply_rotary_pos_emb


def qwen_text_positions(B, S, start):
    """(3, B, S) ids as get_rope_index makes them: text counts up from `start`; from S >= 8 a
    row also holds an image block (t fixed, h/w over a merged grid) and text resumes after it."""
    pos = torch.empty(3, B, S, dtype=torch.int64)
    for b in range(B):
        gw = max(1, int(math.sqrt(S / 2))) if S >= 8 else 0
        gh = (S // 2) // gw if gw else 0
        p = min(S // 4 + b, S - gh * gw)
        cur = start + torch.arange(p)
        pos[:, b, :p] = cur
        img = start + p
        pos[0, b, p : p + gh * gw] = img
        pos[1, b, p : p + gh * gw] = img + torch.arange(gh).repeat_interleave(gw)
        pos[2, b, p : p + gh * gw] = img + torch.arange(gw).repeat(gh)
        after = S - p - gh * gw
        pos[:, b, S - after :] = img + max(gh, gw) + torch.arange(after)
    return pos


TEXT_SHAPES = [  # (B, S, (Hq, Hk) or None for the model's, first position)
    pytest.param(1, 1, None, 3500, id="decode-3500"),
    pytest.param(2, 113, None, 0, id="prefill-113"),
    pytest.param(3, 17, (7, 3), 2900, id="odd-heads"),
    pytest.param(1, 4097, (3, 1), 0, id="s4097"),
]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(("B", "S", "heads", "start"), TEXT_SHAPES)
@pytest.mark.parametrize("model", HF_TEXT)
def test_mrope_matches_hf(model, B, S, heads, start, dtype, hf, device):
    _, _, sec, theta, interleaved, model_heads = HF_TEXT[model]
    Hq, Hk = heads or model_heads
    emb, hf_apply = hf_text(hf, model, (Hq, Hk))
    emb = emb.to(device)
    q, k = make_qk("bhsd", "fused", B, S, Hq, Hk, 128, dtype, device)  # HF's projection layout
    pos = qwen_text_positions(B, S, start).to(device)
    hf_q, hf_k = hf_apply(q, k, *emb(q, pos))
    out = vlmkern.ops.mrope(q, k, pos, sec, theta=theta, interleaved=interleaved)
    hf32 = hf_apply(q.float(), k.float(), *emb(q.float(), pos))
    ref64 = reference.mrope(q.cpu().double(), k.cpu().double(), pos.cpu(), sec, theta, interleaved)
    assert pos.max() >= start and not torch.equal(hf32[0], q.float())
    for ours, h, h32, r in zip(out, (hf_q, hf_k), hf32, ref64, strict=True):
        assert_nontrivial(r)
        assert rel_err(r, h32) <= 1e-6  # the float64 reference is HF's math
        assert ours.shape == h.shape and ours.dtype == dtype and ours.device == h.device
        if dtype == torch.float32:
            assert rel_err(ours, h) <= 1e-6
        else:
            assert_g3(ours, r, h)


def hf_vision(hf, model):
    cfg_cls, emb_cls, kwargs = HF_VISION[model]
    conf_mod, mod = hf[model]
    cfg = getattr(conf_mod, cfg_cls)(depth=1, **kwargs)
    return getattr(mod, emb_cls)(cfg), mod.apply_rotary_pos_emb_vision, kwargs


VISION_SHAPES = [  # (image grid (t, h, w) for HF's ids, or N random tokens; heads; max position)
    pytest.param(None, 1, 16, 50, id="one-token"),
    pytest.param((1, 32, 46), None, 16, None, id="qwen2vl-448x644"),
    pytest.param(None, 113, 3, 4000, id="n113-h3-pos4000"),
    pytest.param(None, 4097, 1, 4000, id="n4097"),
]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(("grid", "N", "H", "max_pos"), VISION_SHAPES)
@pytest.mark.parametrize("model", HF_VISION)
def test_vision_rope_matches_hf(model, grid, N, H, max_pos, dtype, hf, device):
    emb, hf_apply, kwargs = hf_vision(hf, model)
    D = kwargs.get("embed_dim", kwargs.get("hidden_size")) // kwargs["num_heads"]
    if grid is not None:
        from transformers.vision_utils import get_vision_position_ids

        pos = get_vision_position_ids(torch.tensor([grid]), 2)
        N = pos.shape[0]
    else:
        pos = torch.randint(0, max_pos, (N, 2))
    pos, emb = pos.to(device), emb.to(device)
    q, k = make_qk("packed", "fused", 1, N, H, H, D, dtype, device)  # qkv(x).unbind slices
    hf_q, hf_k = hf_apply(q, k, *emb(q, pos))
    out = vlmkern.ops.vision_rope(q, k, pos)
    hf32 = hf_apply(q.float(), k.float(), *emb(q.float(), pos))
    ref64 = reference.vision_rope(q.cpu().double(), k.cpu().double(), pos.cpu())
    for ours, h, h32, r in zip(out, (hf_q, hf_k), hf32, ref64, strict=True):
        assert_nontrivial(r)
        assert rel_err(r, h32) <= 1e-6
        assert ours.shape == h.shape and ours.dtype == dtype and ours.device == h.device
        if dtype == torch.float32:
            assert rel_err(ours, h) <= 1e-6
        else:
            assert_g3(ours, r, h)


def test_fp64_angles_would_fail_the_hf_bound(hf):
    """The 1e-6 parity bound is sharp enough to see angle precision: at positions ~3000, angles
    computed in fp64 (more accurate than HF's fp32 product) differ from HF by far more."""
    emb, hf_apply = hf_text(hf, "qwen2_vl", (4, 1))
    q, k = make_qk("bhsd", "contiguous", 1, 64, 4, 1, 128, torch.float32)
    pos = (3000 + torch.arange(64)).view(1, 1, -1).expand(3, 1, -1)
    hf_q, _ = hf_apply(q, k, *emb(q, pos))
    angles = pos[0, 0, :, None].double() * emb.inv_freq.double()  # text only: t = h = w
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    exact_q = q.double() * cos + torch.cat([-q[..., 64:], q[..., :64]], -1).double() * sin
    assert rel_err(exact_q, hf_q) > 1e-5
    assert rel_err(vlmkern.ops.mrope(q, k, pos, [16, 24, 24])[0], hf_q) <= 1e-6


# --- reference: shapes, layouts, head dims ------------------------------------------------------

SHAPES = [  # (B, S, Hq, Hk)
    pytest.param(1, 1, 1, 1, id="b1-s1-h1"),
    pytest.param(0, 5, 4, 2, id="empty-batch"),
    pytest.param(2, 0, 4, 2, id="empty-seq"),
    pytest.param(2, 7, 5, 1, id="gqa-5-1"),
    pytest.param(3, 113, 3, 3, id="s113-h3"),
    pytest.param(1, 1023, 2, 1, id="s1023"),
    pytest.param(1, 2047, 1, 1, id="s2047"),
    pytest.param(1, 4097, 1, 1, id="s4097"),
    pytest.param(2, 16, 28, 4, id="qwen2vl-heads"),
    pytest.param(1, 9, 32, 8, id="qwen3vl-heads"),
    pytest.param(4, 3, 7, 7, id="b4-h7"),
    pytest.param(1, 64, 16, 16, id="vit-heads"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(("B", "S", "Hq", "Hk"), SHAPES)
def test_shapes_match_reference(B, S, Hq, Hk, dtype, kind, device):
    layout, D = ("packed", 80) if kind == "vision" else ("bhsd", 128)
    q, k = make_qk(layout, "contiguous", B, S, Hq, Hk, D, dtype, device)
    pos = make_positions(kind, layout, B, S, 5000, device=device)
    out = apply(vlmkern.ops, kind, q, k, pos, layout)
    check_kind(kind, out, q, k, pos, layout)
    for o, x in zip(out, (q, k), strict=True):
        assert o.is_contiguous()
        if x.numel():
            assert o.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize(("kind", "layout"), KIND_LAYOUTS)
def test_layouts_match_reference(kind, layout, memory, dtype, pos_dtype, device):
    D = 80 if kind == "vision" else 64
    q, k = make_qk(layout, memory, 2, 9, 5, 3, D, dtype, device)
    pos = make_positions(kind, layout, 2, 9, 4000, pos_dtype, device)
    out = apply(vlmkern.ops, kind, q, k, pos, layout)
    check_kind(kind, out, q, k, pos, layout)
    for o, x in zip(out, (q, k), strict=True):  # the caller's layout, dense, same strides if dense
        assert o.shape == x.shape and _dense(o)
        if _dense(x):
            assert o.stride() == x.stride()
        if memory == "contiguous":
            assert o.is_contiguous()


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("rotary", ["full", "half"])
@pytest.mark.parametrize("D", [64, 72, 80, 128])
@pytest.mark.parametrize("kind", KINDS)
def test_head_dims_and_partial_rotary(kind, D, rotary, dtype, device):
    if kind == "vision" and rotary == "half":
        pytest.skip("vision RoPE always rotates the whole head")
    layout = "packed" if kind == "vision" else "bshd"
    rotary_dim = D // 2 if rotary == "half" else None
    q, k = make_qk(layout, "fused", 3, 11, 3, 1, D, dtype, device)
    pos = make_positions(kind, layout, 3, 11, 3000, device=device)
    out = apply(vlmkern.ops, kind, q, k, pos, layout, rotary_dim)
    check_kind(kind, out, q, k, pos, layout, rotary_dim)


@pytest.mark.parametrize("kind", KINDS[:3])
def test_scale_matches_reference(kind, device):
    q, k = make_qk("bhsd", "transposed", 2, 13, 4, 2, 128, torch.float32, device)
    pos = make_positions(kind, "bhsd", 2, 13, 3000, device=device)
    out = apply(vlmkern.ops, kind, q, k, pos, scale=0.7071)
    check_kind(kind, out, q, k, pos, scale=0.7071)
    unscaled = apply(vlmkern.ops, kind, q, k, pos)
    torch.testing.assert_close(out[0], unscaled[0] * 0.7071, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_position_variants_agree(kind, device):
    """int32 == int64 ids bit for bit; expanded / strided ids; mrope text-only (B, S) ids."""
    B, S, layout = 2, 10, "packed" if kind == "vision" else "bhsd"
    q, k = make_qk(layout, "contiguous", B, S, 3, 1, 64 if kind != "vision" else 72,
                   torch.bfloat16, device)
    pos = make_positions(kind, layout, B, S, 70000, device=device)
    out = apply(vlmkern.ops, kind, q, k, pos, layout)
    for o, o32 in zip(out, apply(vlmkern.ops, kind, q, k, pos.int(), layout), strict=True):
        assert_bit_equal(o32, o)
    if kind == "vision":  # (N, 2) column slice of a (N, 3) table, ids transposed in memory
        wide = torch.cat([pos[:, :1], pos], 1)[:, 1:]
        strided = torch.stack([pos[:, 0], pos[:, 1]]).t()
        variants = [(wide, pos), (strided, pos)]
    elif kind == "rope":  # one row of ids for the whole batch
        row = (500 + torch.arange(S, device=device)).view(1, S)
        variants = [(row.expand(B, S), row.repeat(B, 1))]
    else:  # text only: (B, S) expanded to 3 axes, and a stride-0 (3, B, S)
        text = pos[0]
        variants = [(text, text.expand(3, B, S).contiguous()),
                    (text[None].expand(3, B, S), text.expand(3, B, S).contiguous())]
    for given_pos, dense_pos in variants:
        got = apply(vlmkern.ops, kind, q, k, given_pos, layout)
        for o, e in zip(got, apply(vlmkern.ops, kind, q, k, dense_pos, layout), strict=True):
            assert_bit_equal(o, e)
        check_kind(kind, got, q, k, dense_pos, layout)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("rotary_dim", [None, 64])
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "packed"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["sectioned", "interleaved"])
def test_mrope_inplace_equals_out_of_place(interleaved, layout, memory, rotary_dim, dtype, device):
    q, k = make_qk(layout, memory, 2, 7, 5, 3, 128, dtype, device)
    kind = "mrope_il" if interleaved else "mrope"
    pos = make_positions(kind, layout, 2, 7, 4000, device=device)
    sec = section(kind, (rotary_dim or 128) // 2)
    kw = {"theta": 1e6, "interleaved": interleaved, "rotary_dim": rotary_dim, "layout": layout}
    expected = vlmkern.ops.mrope(q, k, pos, sec, **kw)
    q0, k0 = q.clone(), k.clone()
    ptrs = (q.data_ptr(), k.data_ptr())
    got = vlmkern.ops.mrope_(q, k, pos, sec, **kw)
    assert got[0] is q and got[1] is k and (q.data_ptr(), k.data_ptr()) == ptrs
    assert not torch.equal(q, q0)
    assert_bit_equal(q, expected[0])
    assert_bit_equal(k, expected[1])
    if rotary_dim:  # the rest dims are left as they were
        assert_bit_equal(q[..., rotary_dim:], q0[..., rotary_dim:])
        assert_bit_equal(k[..., rotary_dim:], k0[..., rotary_dim:])


# --- hypothesis fuzz ------------------------------------------------------------------------------


@settings(derandomize=True, max_examples=80, deadline=None, database=None)
@given(
    batch=st.integers(0, 3),
    seq=st.integers(0, 24) | st.just(113),
    hq=st.integers(1, 6),
    hk=st.integers(1, 6),
    head_dim=st.sampled_from([8, 16, 24, 64, 72, 80, 128]),
    rotary_eighths=st.integers(1, 8),
    kind=st.sampled_from(KINDS),
    layout=st.sampled_from(["bhsd", "bshd", "packed"]),
    memory=st.sampled_from(MEMORIES),
    dtype=st.sampled_from([*FLOATS, torch.float64]),
    pos_dtype=st.sampled_from([torch.int32, torch.int64]),
    max_pos=st.sampled_from([1, 50, 5000, 70000]),
    scale=st.sampled_from([1.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_reference(batch, seq, hq, hk, head_dim, rotary_eighths, kind, layout,
                                memory, dtype, pos_dtype, max_pos, scale, seed):
    torch.manual_seed(seed)
    if kind == "vision":
        layout, rotary_dim, scale = "packed", None, 1.0
    else:
        rotary_dim = 2 * max(1, head_dim * rotary_eighths // 16)
    q, k = make_qk(layout, memory, batch, seq, hq, hk, head_dim, dtype)
    pos = make_positions(kind, layout, batch, seq, max_pos, pos_dtype)
    out = apply(vlmkern.ops, kind, q, k, pos, layout, rotary_dim, scale)
    check_kind(kind, out, q, k, pos, layout, rotary_dim, scale)
    if max_pos == 1:  # every position 0: the identity, times scale (a power of 2: exact)
        rot = rotary_dim or head_dim
        for o, x in zip(out, (q, k), strict=True):
            assert_bit_equal(o[..., :rot], x[..., :rot] * scale)


# --- CUDA only (skipped without a GPU) ----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [*FLOATS, torch.float64], ids=str)
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize(("kind", "layout"), KIND_LAYOUTS)
def test_cuda_matches_cpu(kind, layout, memory, dtype):
    """sincosf vs the CPU's cosf/sinf: one fp32 ulp apart at most, so within check()'s bounds."""
    q, k = make_qk(layout, memory, 3, 37, 5, 2, 80 if kind == "vision" else 128, dtype, "cuda")
    pos = make_positions(kind, layout, 3, 37, 30000, device="cuda")
    out = apply(vlmkern.ops, kind, q, k, pos, layout)
    cpu = apply(vlmkern.ops, kind, q.cpu(), k.cpu(), pos.cpu(), layout)
    for o, c in zip(out, cpu, strict=True):
        assert o.device.type == "cuda"
        check(o, c.double())


@pytest.mark.gpu
def test_cuda_angle_precision_vs_hf_at_30000(hf):
    """Large angles: accurate sincosf of HF's fp32 product, not __sincosf."""
    for model in HF_TEXT:
        _, _, sec, theta, interleaved, heads = HF_TEXT[model]
        emb, hf_apply = hf_text(hf, model, heads)
        emb = emb.cuda()
        q, k = make_qk("bhsd", "fused", 1, 256, *heads, 128, torch.float32, "cuda")
        pos = qwen_text_positions(1, 256, 30000).cuda()
        hf_out = hf_apply(q, k, *emb(q, pos))
        out = vlmkern.ops.mrope(q, k, pos, sec, theta=theta, interleaved=interleaved)
        for o, h in zip(out, hf_out, strict=True):
            assert rel_err(o, h) <= 1e-6
    emb, hf_apply, _ = hf_vision(hf, "qwen2_vl")
    q, k = make_qk("packed", "contiguous", 1, 512, 16, 16, 80, torch.float32, "cuda")
    pos = torch.randint(20000, 40000, (512, 2), device="cuda")
    hf_out = hf_apply(q, k, *emb.cuda()(q, pos))
    for o, h in zip(vlmkern.ops.vision_rope(q, k, pos), hf_out, strict=True):
        assert rel_err(o, h) <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [False, True])
def test_cuda_angle_precision_at_30000_without_hf(interleaved):
    """The same check with no transformers: the reference with compute_dtype=None is HF's math
    (fp32 product angle, CUDA cosf/sinf, fp32 rotation)."""
    sec = [24, 20, 20] if interleaved else [16, 24, 24]
    q, k = make_qk("bhsd", "fused", 1, 256, 8, 2, 128, torch.float32, "cuda")
    pos = qwen_text_positions(1, 256, 30000).cuda()
    ref = reference.mrope(q, k, pos, sec, interleaved=interleaved, compute_dtype=None)
    out = vlmkern.ops.mrope(q, k, pos, sec, interleaved=interleaved)
    for o, r in zip(out, ref, strict=True):
        assert rel_err(o, r) <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["rope", "vision"])
def test_cuda_many_tokens_grid_stride(kind):
    """B·S = 300000 tokens > 2^16 (and past the one-block-per-token grid of small inputs)."""
    S, layout = 300_000, "packed" if kind == "vision" else "bshd"
    q, k = make_qk(layout, "contiguous", 1, S, 1, 1, 64, torch.float32, "cuda")
    pos = make_positions(kind, layout, 1, S, 300_000, device="cuda")
    out = apply(vlmkern.ops, kind, q, k, pos, layout)
    ref = apply(reference, kind, q.double(), k.double(), pos, layout)  # fp64 on the GPU
    for o, r in zip(out, ref, strict=True):
        assert_nontrivial(r)
        assert rel_err(o, r) <= 1e-6
        assert rel_err(o.reshape(-1, 64)[-1000:], r.reshape(-1, 64)[-1000:]) <= 1e-6  # the tail
