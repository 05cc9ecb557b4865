"""cross_attention forward and backward against the float64 reference (and, for bf16/fp16, the
same-precision plain-PyTorch chain): shapes, layouts, GQA/MQA, Mllama ranges (mllama_kv_ranges,
HF's dense mask, both masked-row behaviours), Q-Former shared queries, packed segments,
prefix-LM, edge cases and a hypothesis fuzz. Autograd/opcheck/compile/bad inputs:
test_cross_attention_checks.py; HF module parity: tests/nn/test_cross_attention_modules.py."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from testing_utils import FLOATS
from xattn_testing import MEMORIES, check_all, make_qkv, mllama_mask

import vlmkern
from vlmkern import reference
from vlmkern.reference.cross_attention import mllama_dense_mask, visibility

# (B, Sq, Sk, Hq, Hk, D): size 0/1 dims, tile edges (64-row q blocks, 128-key k blocks, 1023),
# GQA 4:1 / MQA, odd head dims, and the real head dims 64 / 72 / 80 / 96 / 128 / 256.
SHAPES = [
    (1, 1, 1, 1, 1, 64),
    (2, 1, 300, 8, 2, 128),     # decode step, Mllama GQA
    (2, 32, 257, 12, 12, 64),   # BLIP-2 Q-Former
    (1, 129, 128, 4, 1, 72),    # MQA, SigLIP head dim
    (3, 64, 200, 6, 3, 80),     # Qwen2-VL ViT head dim
    (1, 65, 1023, 4, 2, 96),
    (2, 7, 0, 4, 2, 64),        # no keys: out 0
    (0, 5, 9, 2, 1, 64),        # empty batch
    (2, 0, 9, 2, 1, 64),        # no queries
    (1, 113, 129, 32, 8, 128),  # Mllama heads
    (1, 17, 50, 3, 3, 5),       # odd head dim
    (1, 40, 60, 2, 1, 256),     # PaliGemma head dim
]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes(shape, dtype):
    B, Sq, Sk, Hq, Hk, D = shape
    q, k, v = make_qkv("bhsd", "fused", B, Sq, Sk, Hq, Hk, D, dtype)
    out, _ = check_all(q, k, v)
    assert out.shape == (B, Hq, Sq, D)
    if Sk == 0:
        assert out.eq(0).all()


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_layouts(layout, memory, dtype):
    q, k, v = make_qkv(layout, memory, 2, 70, 150, 8, 2, 64, dtype)
    out, _ = check_all(q, k, v, layout=layout)
    assert out.shape == q.shape


def test_output_is_dense_bshd_view():
    """HF's out.transpose(1, 2).reshape(B, S, H*D) after the op is a free view."""
    q, k, v = make_qkv("bhsd", "fused", 2, 9, 11, 4, 2, 16, torch.float32)
    out = vlmkern.ops.cross_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("memory", ["fused", "expanded_q", "strided_d"])
def test_strided_inputs_are_not_copied(memory):
    """Views of fused projections, shared queries and strided head dims reach the kernel as they
    are: no copy / clone / contiguous anywhere in the forward."""
    q, k, v = make_qkv("bhsd", memory, 3, 20, 40, 4, 2, 32, torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        vlmkern.ops.cross_attention(q, k, v)
    names = {e.name for e in prof.events()}
    assert "vlmkern::cross_attention" in names
    assert not names & {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}


def test_shared_queries_read_in_place():
    """Learned queries (1, Lq, H, D) expanded over 5 images: batch stride 0 reaches the kernel,
    and the query gradient sums over the images."""
    base = torch.randn(1, 32, 4, 16, requires_grad=True)
    k, v = torch.randn(5, 40, 4, 16), torch.randn(5, 40, 4, 16)
    q = base.expand(5, -1, -1, -1)
    out = vlmkern.ops.cross_attention(q, k, v, layout="bshd")
    out.sum().backward()
    ref = reference.cross_attention(q.detach().double(), k.double(), v.double(), layout="bshd")
    assert (out.double() - ref).abs().max() < 1e-5
    q2 = base.detach().double().expand(5, -1, -1, -1).requires_grad_()
    reference.cross_attention(q2, k.double(), v.double(), layout="bshd").sum().backward()
    assert (base.grad.double() - q2.grad.sum(0, keepdim=True)).abs().max() < 1e-5


# --- Mllama visibility ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float32], ids=str)
@pytest.mark.parametrize(("M", "T"), [(1, 1), (1, 4), (2, 4), (3, 2), (0, 4)])
def test_mllama_kv_ranges(M, T, dtype):
    g = torch.Generator().manual_seed(M * 10 + T)
    mask = (torch.rand(2, 9, M, T, generator=g) < 0.6).to(dtype)
    if dtype == torch.int64 and M:
        mask[0, 0, 0, 0] = 2  # not 1: hidden, as in HF
    ranges = vlmkern.ops.mllama_kv_ranges(mask, 7)
    assert ranges.dtype == torch.int32 and ranges.shape == (2, 9, (M * T + 1) // 2, 2)
    assert torch.equal(ranges, reference.mllama_kv_ranges(mask, 7))
    if M:  # the ranges cover exactly HF's visible keys
        add, _ = mllama_dense_mask(mask.long(), 7, torch.float32)
        hf_visible = add[:, 0] == 0
        for b in range(2):
            vis = visibility(9, M * T * 7, ranges[b])
            seen = vis.any(-1)
            assert torch.equal(vis[seen], hf_visible[b][seen])


@pytest.mark.parametrize("masked_rows", ["zero", "uniform"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_mllama_ranges_attention(dtype, masked_rows):
    B, S, M, T, nvt = 2, 70, 2, 4, 33  # keys 264: three k blocks, a tile spans two
    mask = mllama_mask(B, S, M, T)
    ranges = vlmkern.ops.mllama_kv_ranges(mask, nvt)
    q, k, v = make_qkv("bhsd", "fused", B, S, M * T * nvt, 8, 2, 64, dtype)
    out, grads = check_all(q, k, v, kv_ranges=ranges, masked_rows=masked_rows)
    dead = (mask != 1).flatten(2).all(-1)  # (B, S) rows that see no tile
    assert dead.any() and not dead.all()
    if masked_rows == "zero":  # G6: exactly 0 in forward, and no gradient through dead rows
        assert out.transpose(1, 2)[dead].eq(0).all()
        assert grads[0].transpose(1, 2)[dead].eq(0).all()


@pytest.mark.parametrize("masked_rows", ["zero", "uniform"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_decode_gqa_rows_with_ranges(dtype, masked_rows):
    """Decode (Sq = 1) with GQA runs each group's q heads as rows of one kv head: ranges, a dead
    sequence, forward and gradients, and the same result as the per-head path (G = 1 view)."""
    q, k, v = make_qkv("bhsd", "fused", 3, 1, 150, 8, 2, 64, dtype)
    ranges = torch.tensor([[[[10, 40], [90, 120]]], [[[0, 0], [0, 0]]], [[[5, 150], [0, 0]]]],
                          dtype=torch.int32)
    out, grads = check_all(q, k, v, kv_ranges=ranges, masked_rows=masked_rows)
    if masked_rows == "zero":
        assert out[1].eq(0).all() and grads[0][1].eq(0).all()
    # the same heads one kv head each (no GQA: the per-head path) give the same rows
    kx, vx = (t.repeat_interleave(4, dim=1) for t in (k, v))
    ref = vlmkern.ops.cross_attention(q, kx, vx, kv_ranges=ranges, masked_rows=masked_rows)
    atol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)


def test_uniform_rows_match_hf_dense_mask():
    """masked_rows="uniform" is HF's additive-mask attention, dead rows included."""
    B, S, M, T, nvt = 2, 24, 2, 3, 5
    mask = mllama_mask(B, S, M, T, seed=3)
    q, k, v = make_qkv("bhsd", "contiguous", B, S, M * T * nvt, 4, 2, 32, torch.float64)
    add, _ = mllama_dense_mask(mask, nvt, torch.float64)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    hf = torch.softmax(q @ kr.transpose(-1, -2) * 32**-0.5 + add, -1) @ vr
    out = vlmkern.ops.cross_attention(q, k, v, kv_ranges=vlmkern.ops.mllama_kv_ranges(mask, nvt),
                                      masked_rows="uniform")
    assert (out - hf).abs().max() < 1e-12


def test_no_nan_when_every_row_is_masked():
    q, k, v = make_qkv("bhsd", "contiguous", 1, 5, 20, 2, 1, 16, torch.float32)
    ranges = torch.zeros(1, 5, 2, 2, dtype=torch.int32)
    out, grads = check_all(q, k, v, kv_ranges=ranges)
    assert out.eq(0).all() and all(g.eq(0).all() for g in grads)


# --- packed segments and prefix-LM ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("visibility", ["full", "ranges", "prefix_lm"])
def test_packed_segments(visibility, dtype):
    """Qwen2-VL ViT-like varlen (hd 80) with an empty q segment and an empty k segment."""
    cq = torch.tensor([0, 3, 3, 70, 75, 205], dtype=torch.int32)
    ck = torch.tensor([0, 10, 15, 15, 80, 210], dtype=torch.int32)
    q = torch.randn(205, 3 * 4 * 80).to(dtype)[:, : 4 * 80].unflatten(-1, (4, 80))
    k, v = (torch.randn(210, 2, 80).to(dtype) for _ in range(2))
    kw = {"cu_seqlens_q": cq, "cu_seqlens_k": ck}
    if visibility == "ranges":
        lens = (ck[1:] - ck[:-1]).repeat_interleave(cq[1:] - cq[:-1])
        lo = (torch.rand(205) * lens).long()
        kw["kv_ranges"] = torch.stack([lo, lens], -1).unsqueeze(1).int()  # (total_q, 1, 2)
    elif visibility == "prefix_lm":
        kw.update(mode="prefix_lm", prefix_len=torch.tensor([4, 0, 0, 2, 100]))
    out, _ = check_all(q, k, v, **kw)
    assert out.shape == q.shape


@pytest.mark.parametrize("masked_rows", ["zero", "uniform"])
@pytest.mark.parametrize(("Sq", "Sk"), [(37, 37), (1, 20), (150, 150), (30, 20)])
def test_prefix_lm(Sq, Sk, masked_rows):
    """PaliGemma [image | prompt | answer]: prefix 0, inside, past the end; decode (Sq < Sk);
    Sq > Sk leaves the first rows (prefix 0) with no key."""
    q, k, v = make_qkv("bhsd", "fused", 3, Sq, Sk, 4, 1, 32, torch.float32)
    out, _ = check_all(q, k, v, mode="prefix_lm", prefix_len=torch.tensor([0, 5, 400]),
                       masked_rows=masked_rows)


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_scale(scale):
    q, k, v = make_qkv("bshd", "contiguous", 2, 20, 30, 2, 2, 16, torch.float32)
    check_all(q, k, v, scale=scale, layout="bshd")


def test_return_lse():
    q, k, v = make_qkv("bhsd", "contiguous", 2, 9, 30, 4, 2, 16, torch.float32)
    ranges = torch.tensor([0, 12]).repeat(2, 9, 1, 1).int()
    ranges[0, 0] = 0  # a dead row: lse -inf
    out, lse = vlmkern.ops.cross_attention(q, k, v, kv_ranges=ranges, return_lse=True)
    ref_out, ref_lse = reference.cross_attention(q.double(), k.double(), v.double(),
                                                 kv_ranges=ranges, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 9)
    assert torch.isneginf(lse[0, :, 0]).all()
    fin = torch.isfinite(ref_lse)
    assert (lse[fin].double() - ref_lse[fin]).abs().max() < 1e-5


# --- fuzz (G12) -----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    B=st.integers(0, 3), Sq=st.integers(0, 80), Sk=st.integers(0, 140), Hk=st.integers(1, 3),
    G=st.sampled_from([1, 2, 4]), D=st.sampled_from([8, 16, 40, 64, 72]),
    dtype=st.sampled_from(FLOATS), layout=st.sampled_from(["bhsd", "bshd"]),
    memory=st.sampled_from(MEMORIES), vis=st.sampled_from(["full", "ranges", "prefix_lm"]),
    masked_rows=st.sampled_from(["zero", "uniform"]), seed=st.integers(0, 2**16),
)
def test_fuzz(B, Sq, Sk, Hk, G, D, dtype, layout, memory, vis, masked_rows, seed):
    torch.manual_seed(seed)
    q, k, v = make_qkv(layout, memory, B, Sq, Sk, G * Hk, Hk, D, dtype)
    kw = {"layout": layout, "masked_rows": masked_rows}
    if vis == "ranges":
        a, b = torch.randint(0, Sk + 1, (2, B, Sq, 3))
        kw["kv_ranges"] = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], -1).int()
    elif vis == "prefix_lm":
        kw.update(mode="prefix_lm", prefix_len=torch.randint(0, Sk + 2, (B,)))
    check_all(q, k, v, grad=B * Sq * Sk < 6000, **kw)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    lens=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=4),
    Hk=st.integers(1, 2), G=st.sampled_from([1, 2, 4]),
    D=st.sampled_from([8, 64, 72, 80, 96, 128, 256]), dtype=st.sampled_from(FLOATS),
    strided=st.booleans(), vis=st.sampled_from(["full", "ranges", "prefix_lm"]),
    masked_rows=st.sampled_from(["zero", "uniform"]), seed=st.integers(0, 2**16),
)
def test_fuzz_packed(lens, Hk, G, D, dtype, strided, vis, masked_rows, seed):
    """Packed segments (cu_seqlens, B = 1) with empty q or k segments, GQA, every CUDA head dim
    and 256, q as a view of a fused qkv row, each visibility: vs float64 (G12)."""
    assume(any(a and b for a, b in lens))  # some row sees keys: the reference is not all zero
    torch.manual_seed(seed)
    lq, lk = torch.tensor([a for a, _ in lens]), torch.tensor([b for _, b in lens])
    cq = torch.cat([torch.zeros(1), lq.cumsum(0)]).int()
    ck = torch.cat([torch.zeros(1), lk.cumsum(0)]).int()
    tq, tk, hq = int(lq.sum()), int(lk.sum()), G * Hk
    q = (torch.randn(tq, 3 * hq * D)[:, : hq * D] if strided else torch.randn(tq, hq * D))
    q = q.to(dtype).unflatten(-1, (hq, D))
    k, v = (torch.randn(tk, Hk, D).to(dtype) for _ in range(2))
    kw = {"cu_seqlens_q": cq, "cu_seqlens_k": ck, "masked_rows": masked_rows}
    if vis == "ranges":  # (total_q, 2, 2) within each row's own segment of keys
        row_k = lk.repeat_interleave(lq)
        a, b = ((torch.rand(tq, 2) * (row_k[:, None] + 1)).floor().long() for _ in range(2))
        kw["kv_ranges"] = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], -1).int()
    elif vis == "prefix_lm":
        kw.update(mode="prefix_lm", prefix_len=torch.randint(0, 45, (len(lens),)))
    out, _ = check_all(q, k, v, grad=tq * tk * hq < 20000, **kw)
    assert out.shape == q.shape

