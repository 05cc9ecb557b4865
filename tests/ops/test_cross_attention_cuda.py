"""CUDA cross_attention forward and backward (flash-attention 2 kernels,
csrc/cuda/kernels/cross_attention_*.cuh) against the float64 reference by the bf16/fp16 "≤ 2×
PyTorch's own error" rule (G3; 3× for gradients): every head dim, GQA/MQA, Mllama ranges with dead
rows in both masked-row modes, packed varlen with empty segments, prefix-LM, Q-Former shared
queries, Lk = 0, Lq = 1, fused-qkv and strided views, an lse gradient; lse; 20× bit-identical
repeats (forward and backward), no unwritten gradient elements, CUDA graph capture, a non-default
stream, torch.compile of forward + backward, a > 2^31-element case; the CUDA-only errors (fp32,
head dims). All `gpu`: auto-skipped without CUDA."""

import pytest
import torch
from testing_utils import assert_nontrivial, deterministic_mode
from torch._dynamo.testing import CompileCounterWithBackend
from xattn_testing import check, make_qkv, mllama_mask

import vlmkern
from vlmkern import reference

pytestmark = pytest.mark.gpu

LOWP = [torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 72, 80, 96, 128]


def _cuda(kw):
    return {n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}


def check_cuda(q, k, v, lse_tol=1e-3, **kw):
    """CUDA forward of q, k, v (CPU tensors, any views: moved to the GPU as the same views) vs the
    float64 reference and the same-precision PyTorch chain; lse vs the float64 lse. Returns the
    CUDA (out, lse) on the CPU."""
    qc, kc, vc = (_same_view_on_cuda(t) for t in (q, k, v))
    out, lse = vlmkern.ops.cross_attention(qc, kc, vc, return_lse=True, **_cuda(kw))
    torch.cuda.synchronize()
    out, lse = out.cpu(), lse.cpu()
    ref, ref_lse = reference.cross_attention(*(t.double() for t in (q, k, v)), return_lse=True,
                                             **kw)
    pt = reference.cross_attention(qc, kc, vc, compute_dtype=None, **_cuda(kw)).cpu()
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert not out.isnan().any()
    check(out, ref, pt)
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    if fin.any():
        err = (lse[fin].double() - ref_lse[fin]).abs().max().item()
        assert err <= lse_tol * max(1.0, ref_lse[fin].abs().max().item()), err
    return out, lse


def _same_view_on_cuda(t):
    """t's storage copied to the GPU and t's view (sizes, strides, offset) taken of it."""
    if t.numel() == 0:
        return t.cuda()
    base = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype)
    base.untyped_storage().copy_(t.untyped_storage())
    return base.cuda().as_strided(t.shape, t.stride(), t.storage_offset())


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims(D, dtype):
    q, k, v = make_qkv("bhsd", "fused", 2, 130, 200, 8, 2, D, dtype)
    check_cuda(q, k, v)


# (B, Sq, Sk, Hq, Hk, D): decode, Q-Former, MQA, tile edges (64-row windows, 64-key tiles), no keys.
SHAPES = [
    (1, 1, 1, 1, 1, 64),
    (2, 1, 300, 8, 2, 128),
    (2, 32, 257, 12, 12, 64),
    (1, 129, 128, 4, 1, 72),
    (3, 64, 200, 6, 3, 80),
    (1, 65, 1023, 4, 2, 96),
    (2, 7, 0, 4, 2, 64),
    (1, 113, 129, 32, 8, 128),
    (1, 200, 65, 2, 2, 64),
]


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes(shape, dtype):
    B, Sq, Sk, Hq, Hk, D = shape
    q, k, v = make_qkv("bhsd", "fused", B, Sq, Sk, Hq, Hk, D, dtype)
    out, lse = check_cuda(q, k, v)
    if Sk == 0:
        assert out.eq(0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("memory", ["contiguous", "fused", "strided_d", "offset", "expanded_q"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_layouts(layout, memory):
    """Fused-projection views, batch-stride-0 learned queries (read in place), a stride-2 head dim
    and a one-element offset (copied to a contiguous tensor first)."""
    q, k, v = make_qkv(layout, memory, 2, 70, 150, 8, 2, 64, torch.bfloat16)
    check_cuda(q, k, v, layout=layout)


def test_fused_qkv_single_buffer():
    """q, k, v as views of one (B, S, 3, H, D) qkv projection (self-attention layout)."""
    qkv = torch.randn(2, 90, 3, 4, 80).to(torch.float16)
    q, k, v = qkv.unbind(2)
    check_cuda(q, k, v, layout="bshd")


def test_qformer_shared_queries():
    base = torch.randn(1, 32, 12, 64).to(torch.bfloat16)
    q = base.expand(16, -1, -1, -1)
    k, v = (torch.randn(16, 257, 12, 64).to(torch.bfloat16) for _ in range(2))
    check_cuda(q, k, v, layout="bshd")


@pytest.mark.parametrize("masked_rows", ["zero", "uniform"])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_mllama_ranges(dtype, masked_rows):
    B, S, M, T, nvt = 2, 140, 2, 4, 33  # 264 keys: 5 key tiles, image tiles straddle them
    mask = mllama_mask(B, S, M, T)
    ranges = vlmkern.ops.mllama_kv_ranges(mask, nvt)
    q, k, v = make_qkv("bhsd", "fused", B, S, M * T * nvt, 8, 2, 128, dtype)
    out, lse = check_cuda(q, k, v, kv_ranges=ranges, masked_rows=masked_rows)
    dead = (mask != 1).flatten(2).all(-1)  # (B, S)
    assert dead.any() and not dead.all()
    if masked_rows == "zero":  # exactly 0 and lse -inf
        assert out.transpose(1, 2)[dead].eq(0).all()
        assert torch.isneginf(lse.transpose(1, 2)[dead]).all()


def test_ranges_int64_and_every_row_dead():
    q, k, v = make_qkv("bhsd", "contiguous", 1, 5, 20, 2, 1, 64, torch.bfloat16)
    out, lse = check_cuda(q, k, v, kv_ranges=torch.zeros(1, 5, 2, 2, dtype=torch.int64))
    assert out.eq(0).all() and torch.isneginf(lse).all()
    r = torch.tensor([[3, 9], [15, 20]]).repeat(1, 5, 1, 1)  # int64, two disjoint ranges
    check_cuda(q, k, v, kv_ranges=r)


def test_mllama_kv_ranges_cuda():
    mask = mllama_mask(3, 50, 3, 4)
    for dt in (torch.int64, torch.bool, torch.float32):
        got = vlmkern.ops.mllama_kv_ranges(mask.to(dt).cuda(), 1601)
        assert got.is_cuda and got.dtype == torch.int32
        assert torch.equal(got.cpu(), reference.mllama_kv_ranges(mask.to(dt), 1601))
    assert vlmkern.ops.mllama_kv_ranges(torch.ones(2, 3, 0, 4).cuda(), 7).shape == (2, 3, 0, 2)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("visibility", ["full", "ranges", "prefix_lm"])
def test_packed_segments(visibility, dtype):
    """Qwen2-VL-ViT-like varlen (hd 80): an empty q segment, an empty k segment, segments smaller
    than and straddling the 64-row windows."""
    cq = torch.tensor([0, 3, 3, 70, 75, 205, 206], dtype=torch.int32)
    ck = torch.tensor([0, 10, 15, 15, 80, 210, 300], dtype=torch.int32)
    q = torch.randn(206, 3 * 4 * 80).to(dtype)[:, : 4 * 80].unflatten(-1, (4, 80))
    k, v = (torch.randn(300, 2, 80).to(dtype) for _ in range(2))
    kw = {"cu_seqlens_q": cq, "cu_seqlens_k": ck}
    if visibility == "ranges":
        lens = (ck[1:] - ck[:-1]).repeat_interleave(cq[1:] - cq[:-1])
        lo = (torch.rand(206) * lens).long()
        kw["kv_ranges"] = torch.stack([lo, lens], -1).unsqueeze(1).int()  # (total_q, 1, 2)
    elif visibility == "prefix_lm":
        kw.update(mode="prefix_lm", prefix_len=torch.tensor([4, 0, 0, 2, 100, 1]))
    out, _ = check_cuda(q, k, v, **kw)
    assert out.shape == q.shape


def test_packed_many_small_segments():
    """129 segments of 1..9 rows: up to 64 segments share one 64-row window (one pass each)."""
    lq = torch.randint(1, 10, (129,))
    lk = torch.randint(0, 70, (129,))
    cq = torch.cat([torch.zeros(1), lq.cumsum(0)]).int()
    ck = torch.cat([torch.zeros(1), lk.cumsum(0)]).int()
    q = torch.randn(int(cq[-1]), 4, 64).to(torch.bfloat16)
    k, v = (torch.randn(int(ck[-1]), 4, 64).to(torch.bfloat16) for _ in range(2))
    check_cuda(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, masked_rows="uniform")


@pytest.mark.parametrize("masked_rows", ["zero", "uniform"])
@pytest.mark.parametrize(("Sq", "Sk"), [(37, 37), (1, 20), (150, 150), (30, 20), (200, 260)])
def test_prefix_lm(Sq, Sk, masked_rows):
    q, k, v = make_qkv("bhsd", "fused", 3, Sq, Sk, 8, 1, 96, torch.bfloat16)
    check_cuda(q, k, v, mode="prefix_lm", prefix_len=torch.tensor([0, 5, 400]),
               masked_rows=masked_rows)


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_scale(scale):
    q, k, v = make_qkv("bshd", "contiguous", 2, 20, 30, 2, 2, 64, torch.float16)
    check_cuda(q, k, v, scale=scale, layout="bshd")


def test_bit_identical_repeats():
    q, k, v = (t.cuda() for t in make_qkv("bhsd", "fused", 2, 300, 700, 8, 2, 128,
                                          torch.bfloat16))
    ranges = vlmkern.ops.mllama_kv_ranges(mllama_mask(2, 300, 2, 2), 175).cuda()
    first = vlmkern.ops.cross_attention(q, k, v, kv_ranges=ranges, return_lse=True)
    for _ in range(20):
        again = vlmkern.ops.cross_attention(q, k, v, kv_ranges=ranges, return_lse=True)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_cuda_graph_capture():
    q, k, v = (t.cuda() for t in make_qkv("bhsd", "contiguous", 2, 70, 150, 8, 2, 64,
                                          torch.bfloat16))
    cq = torch.tensor([0, 30, 70, 140], dtype=torch.int32, device="cuda")
    qp, kp, vp = (t.transpose(1, 2).reshape(-1, t.shape[1], 64) for t in (q, k, v))
    eager = vlmkern.ops.cross_attention(q, k, v)
    eager_p = vlmkern.ops.cross_attention(qp, kp[:140], vp[:140], cu_seqlens_q=cq,
                                          cu_seqlens_k=cq)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        vlmkern.ops.cross_attention(q, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = vlmkern.ops.cross_attention(q, k, v)
        out_p = vlmkern.ops.cross_attention(qp, kp[:140], vp[:140], cu_seqlens_q=cq,
                                            cu_seqlens_k=cq)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(out_p, eager_p)


def test_non_default_stream():
    q, k, v = (t.cuda() for t in make_qkv("bhsd", "fused", 2, 70, 150, 8, 2, 80,
                                          torch.float16))
    expected = vlmkern.ops.cross_attention(q, k, v)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = vlmkern.ops.cross_attention(q, k, v)
    stream.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.slow
def test_over_2_31_elements():
    """k / v of 2^31 + elements (B = 1, 4.2M keys x 8 heads x 64): 64-bit offsets; only the
    queries' last two key tiles are checked against a float64 slice via kv_ranges."""
    Sk, Hk, D = (1 << 31) // (8 * 64) + 128, 8, 64
    k = torch.empty(1, Sk, Hk, D, dtype=torch.bfloat16, device="cuda").normal_()
    v = torch.empty(1, Sk, Hk, D, dtype=torch.bfloat16, device="cuda").normal_()
    assert k.numel() > 2**31
    q = torch.randn(1, 70, 8, D, device="cuda").to(torch.bfloat16)
    lo = Sk - 100
    ranges = torch.tensor([lo, Sk], dtype=torch.int32, device="cuda").repeat(1, 70, 1, 1)
    out = vlmkern.ops.cross_attention(q, k, v, kv_ranges=ranges, layout="bshd")
    ref = reference.cross_attention(q.double(), k[:, lo:].double(), v[:, lo:].double(),
                                    layout="bshd")
    pt = reference.cross_attention(q, k[:, lo:], v[:, lo:], compute_dtype=None, layout="bshd")
    check(out.cpu(), ref.cpu(), pt.cpu())


@pytest.mark.slow
def test_backward_over_2_31_elements():
    """dk / dv of 2^31 + elements: 64-bit offsets in the dK / dV kernel's reads and writes. The
    queries see only the last 100 keys (kv_ranges): those keys' gradients and dq vs a float64
    slice; every other key's gradient is exactly 0."""
    Sk, Hk, D = (1 << 31) // (8 * 64) + 128, 8, 64
    k = torch.empty(1, Sk, Hk, D, dtype=torch.bfloat16, device="cuda").normal_()
    v = torch.empty(1, Sk, Hk, D, dtype=torch.bfloat16, device="cuda").normal_()
    q = torch.randn(1, 70, 8, D, device="cuda").to(torch.bfloat16)
    g = torch.randn(1, 70, 8, D, device="cuda").to(torch.bfloat16)
    lo = Sk - 100
    ranges = torch.tensor([lo, Sk], dtype=torch.int32, device="cuda").repeat(1, 70, 1, 1)
    dq, dk, dv = _grads(vlmkern.ops, q, k, v, g, None, kv_ranges=ranges, layout="bshd")
    assert dk.numel() > 2**31
    assert dk[:, :lo].count_nonzero() == 0 and dv[:, :lo].count_nonzero() == 0
    ks, vs = k[:, lo:], v[:, lo:]
    ref = _grads(reference, q.cpu().double(), ks.cpu().double(), vs.cpu().double(),
                 g.cpu().double(), None, layout="bshd")
    pt = _grads(reference, q, ks, vs, g, None, compute_dtype=None, layout="bshd")
    for a, r, p in zip((dq, dk[:, lo:], dv[:, lo:]), ref, pt, strict=True):
        check(a.cpu(), r, p.cpu(), factor=3.0)


def test_cuda_only_errors():
    q, k, v = (t.cuda() for t in make_qkv("bhsd", "contiguous", 1, 4, 6, 2, 1, 64,
                                          torch.float32))
    with pytest.raises(RuntimeError, match=r"vlmkern.cross_attention: the CUDA kernel takes "
                       r"float16 or bfloat16"):
        vlmkern.ops.cross_attention(q, k, v)
    q, k, v = (t.cuda() for t in make_qkv("bhsd", "contiguous", 1, 4, 6, 2, 1, 40,
                                          torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"vlmkern.cross_attention: head dim D=40 is not "
                       r"supported on CUDA"):
        vlmkern.ops.cross_attention(q, k, v)


# ---- backward (csrc/cuda/kernels/cross_attention_bwd.cuh) ---------------------------------------


def _grads(mod, q, k, v, g, glse, **kw):
    """(dq, dk, dv) of mod.cross_attention's (out, lse) against (g, glse) (glse None: out only;
    rows with lse = -inf get no lse gradient)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = mod.cross_attention(q, k, v, return_lse=True, **kw)
    if not out.requires_grad:  # the reference of an empty key set is a constant
        return tuple(torch.zeros_like(t) for t in (q, k, v))
    outs, gos = [out], [g.to(out.dtype)]
    if glse is not None:
        outs.append(lse)
        gos.append(torch.where(torch.isfinite(lse), glse.to(lse.dtype), 0.0))
    return torch.autograd.grad(outs, (q, k, v), gos, allow_unused=True, materialize_grads=True)


def check_cuda_backward(q, k, v, grad_lse=False, **kw):
    """CUDA dq, dk, dv of q, k, v (CPU tensors, any views: moved to the GPU as the same views)
    vs the float64 reference's autograd and the same-precision PyTorch chain on the GPU (G3,
    3× for gradients); grad_lse: a random lse gradient too. Returns the CUDA grads on the CPU."""
    qc, kc, vc = (_same_view_on_cuda(t) for t in (q, k, v))
    kwc = _cuda(kw)
    out, lse = vlmkern.ops.cross_attention(qc, kc, vc, return_lse=True, **kwc)
    g = torch.randn(out.shape).to(q.dtype)
    glse = torch.randn(lse.shape) if grad_lse else None
    glse_c = None if glse is None else glse.cuda()
    grads = [t.cpu() for t in _grads(vlmkern.ops, qc, kc, vc, g.cuda(), glse_c, **kwc)]
    rgrads = _grads(reference, *(t.double() for t in (q, k, v)), g.double(),
                    None if glse is None else glse.double(), **kw)
    pgrads = [t.cpu() for t in _grads(reference, qc, kc, vc, g.cuda(), glse_c,
                                      compute_dtype=None, **kwc)]
    if k.numel():
        assert_nontrivial(rgrads[2])  # dv = Pᵀ dO: zero only if no row sees a key
    for a, r, pt, t in zip(grads, rgrads, pgrads, (q, k, v), strict=True):
        assert a.dtype == t.dtype and a.shape == t.shape
        assert not a.isnan().any()
        check(a, r, pt, factor=3.0)
    return grads


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_backward_head_dims(D, dtype):
    q, k, v = make_qkv("bhsd", "fused", 2, 130, 200, 8, 2, D, dtype)
    check_cuda_backward(q, k, v)


# Backward shapes: SHAPES without Sk = 1 (one key: dq = dk = 0 exactly in the reference, and fp32
# rounding of dP − delta ~1e-6 is above fp16's floor there), plus a 3-key decode step.
BWD_SHAPES = [s for s in SHAPES if s[2] != 1] + [(1, 1, 3, 1, 1, 64)]


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=str)
def test_backward_shapes(shape, dtype):
    B, Sq, Sk, Hq, Hk, D = shape
    q, k, v = make_qkv("bhsd", "fused", B, Sq, Sk, Hq, Hk, D, dtype)
    dq, dk, dv = check_cuda_backward(q, k, v, grad_lse=True)
    if Sk == 0:
        assert dq.eq(0).all() and dk.numel() == 0


@pytest.mark.parametrize("memory", ["contiguous", "fused", "strided_d", "offset", "expanded_q"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_backward_layouts(layout, memory):
    """Gradients of every input view: expanded_q (batch stride 0) gets one dq per batch row."""
    q, k, v = make_qkv(layout, memory, 2, 70, 150, 8, 2, 64, torch.bfloat16)
    check_cuda_backward(q, k, v, layout=layout)


def test_backward_qformer_shared_queries():
    """BLIP-2 Q-Former: learned queries (1, 32, H, D) expanded over 16 images; the query gradient
    is the sum over the images (autograd's expand backward of the per-row dq)."""
    base = torch.randn(1, 32, 12, 64).to(torch.bfloat16)
    k, v = (torch.randn(16, 257, 12, 64).to(torch.bfloat16) for _ in range(2))
    g = torch.randn(16, 32, 12, 64).to(torch.bfloat16)
    grads = []
    for mod, cast, dev, kw in ((vlmkern.ops, None, "cuda", {}),
                               (reference, torch.float64, "cpu", {}),
                               (reference, None, "cuda", {"compute_dtype": None})):
        bq = (base if cast is None else base.to(cast)).to(dev).requires_grad_()
        kk, vv = ((t if cast is None else t.to(cast)).to(dev).requires_grad_() for t in (k, v))
        out = mod.cross_attention(bq.expand(16, -1, -1, -1), kk, vv, layout="bshd", **kw)
        grads.append([t.cpu() for t in torch.autograd.grad(out, (bq, kk, vv), g.to(dev,
                                                                                out.dtype))])
    assert grads[0][0].shape == (1, 32, 12, 64)
    for a, r, pt in zip(*grads, strict=True):
        assert_nontrivial(r)
        check(a, r, pt, factor=3.0)


@pytest.mark.parametrize("masked_rows", ["zero", "uniform"])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_backward_mllama_ranges(dtype, masked_rows):
    B, S, M, T, nvt = 2, 140, 2, 4, 33  # 264 keys: 5 key windows, image tiles straddle them
    mask = mllama_mask(B, S, M, T)
    ranges = vlmkern.ops.mllama_kv_ranges(mask, nvt)
    q, k, v = make_qkv("bhsd", "fused", B, S, M * T * nvt, 8, 2, 128, dtype)
    dq, _, _ = check_cuda_backward(q, k, v, grad_lse=True, kv_ranges=ranges,
                                   masked_rows=masked_rows)
    dead = (mask != 1).flatten(2).all(-1)  # (B, S)
    assert dead.any() and not dead.all()
    if masked_rows == "zero":  # G6: no gradient through dead rows, exactly
        assert dq.transpose(1, 2)[dead].eq(0).all()
    else:  # uniform: dead rows attend everywhere, their dq is not 0
        assert dq.transpose(1, 2)[dead].ne(0).any()


def test_backward_ranges_every_row_dead():
    q, k, v = make_qkv("bhsd", "contiguous", 1, 5, 20, 2, 1, 64, torch.bfloat16)
    qc, kc, vc = (t.cuda().requires_grad_() for t in (q, k, v))
    out = vlmkern.ops.cross_attention(qc, kc, vc, kv_ranges=torch.zeros(1, 5, 2, 2).int().cuda())
    grads = torch.autograd.grad(out, (qc, kc, vc), torch.randn_like(out))
    assert all(g.eq(0).all() for g in grads)
    r = torch.tensor([[3, 9], [15, 20]]).repeat(1, 5, 1, 1)  # int64, two disjoint ranges
    check_cuda_backward(q, k, v, kv_ranges=r)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("visibility", ["full", "ranges", "prefix_lm"])
def test_backward_packed_segments(visibility, dtype):
    """Varlen (hd 80): an empty q segment, an empty k segment (its rows see nothing), segments
    smaller than and straddling the 64-row q windows and the 64-key windows."""
    cq = torch.tensor([0, 3, 3, 70, 75, 205, 206], dtype=torch.int32)
    ck = torch.tensor([0, 10, 15, 15, 80, 210, 300], dtype=torch.int32)
    q = torch.randn(206, 3 * 4 * 80).to(dtype)[:, : 4 * 80].unflatten(-1, (4, 80))
    k, v = (torch.randn(300, 2, 80).to(dtype) for _ in range(2))
    kw = {"cu_seqlens_q": cq, "cu_seqlens_k": ck}
    if visibility == "ranges":
        lens = (ck[1:] - ck[:-1]).repeat_interleave(cq[1:] - cq[:-1])
        lo = (torch.rand(206) * lens).long()
        kw["kv_ranges"] = torch.stack([lo, lens], -1).unsqueeze(1).int()  # (total_q, 1, 2)
    elif visibility == "prefix_lm":
        kw.update(mode="prefix_lm", prefix_len=torch.tensor([4, 0, 0, 2, 100, 1]))
    check_cuda_backward(q, k, v, grad_lse=visibility == "full", **kw)


def test_backward_packed_many_small_segments():
    """129 segments of 1..9 rows and 0..69 keys: many segments share a q window and a key
    window (one pass each in both gradient kernels)."""
    lq = torch.randint(1, 10, (129,))
    lk = torch.randint(0, 70, (129,))
    cq = torch.cat([torch.zeros(1), lq.cumsum(0)]).int()
    ck = torch.cat([torch.zeros(1), lk.cumsum(0)]).int()
    q = torch.randn(int(cq[-1]), 4, 64).to(torch.bfloat16)
    k, v = (torch.randn(int(ck[-1]), 2, 64).to(torch.bfloat16) for _ in range(2))
    for masked_rows in ("zero", "uniform"):
        check_cuda_backward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, masked_rows=masked_rows)


@pytest.mark.parametrize("masked_rows", ["zero", "uniform"])
@pytest.mark.parametrize(("Sq", "Sk"), [(37, 37), (1, 20), (150, 150), (30, 20), (200, 260)])
def test_backward_prefix_lm(Sq, Sk, masked_rows):
    q, k, v = make_qkv("bhsd", "fused", 3, Sq, Sk, 8, 1, 96, torch.bfloat16)
    check_cuda_backward(q, k, v, grad_lse=Sq == 150, mode="prefix_lm",
                        prefix_len=torch.tensor([0, 5, 400]), masked_rows=masked_rows)


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_backward_scale(scale):
    q, k, v = make_qkv("bshd", "contiguous", 2, 20, 30, 2, 2, 64, torch.float16)
    check_cuda_backward(q, k, v, scale=scale, layout="bshd")


def _bwd_inputs(packed=False):
    """A backward op call's arguments (CUDA): dense Mllama ranges, or packed segments."""
    q, k, v = (t.cuda() for t in make_qkv("bshd", "fused", 2, 300, 700, 8, 2, 128,
                                          torch.bfloat16))
    rest = [vlmkern.ops.mllama_kv_ranges(mllama_mask(2, 300, 2, 2), 175).cuda(), None, None,
            None, None, "zero"]
    if packed:
        q, k, v = (t.reshape(1, -1, *t.shape[2:]) for t in (q, k, v))
        cq = torch.tensor([0, 100, 130, 600], dtype=torch.int32, device="cuda")
        ck = torch.tensor([0, 500, 500, 1400], dtype=torch.int32, device="cuda")
        rest = [None, cq, ck, None, None, "uniform"]
    out, lse = torch.ops.vlmkern.cross_attention(q, k, v, *rest)
    g, glse = torch.randn_like(out), torch.randn_like(lse)
    return (g, q, k, v, out, lse, glse, *rest)


def test_backward_bit_identical_repeats():
    """G8: no atomics, fixed summation order: 20 repeats give the same bits."""
    for packed in (False, True):
        args = _bwd_inputs(packed)
        first = torch.ops.vlmkern.cross_attention_backward(*args)
        for _ in range(20):
            again = torch.ops.vlmkern.cross_attention_backward(*args)
            assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))


def test_backward_no_unwritten_elements():
    """G7: fresh buffers are NaN-filled in deterministic mode; the gradients have no NaN."""
    with deterministic_mode():
        for packed in (False, True):
            grads = torch.ops.vlmkern.cross_attention_backward(*_bwd_inputs(packed))
            assert not any(g.isnan().any() for g in grads)


def test_backward_cuda_graph_capture():
    dense, packed = _bwd_inputs(False), _bwd_inputs(True)
    eager = torch.ops.vlmkern.cross_attention_backward(*dense)
    eager_p = torch.ops.vlmkern.cross_attention_backward(*packed)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        torch.ops.vlmkern.cross_attention_backward(*dense)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = torch.ops.vlmkern.cross_attention_backward(*dense)
        got_p = torch.ops.vlmkern.cross_attention_backward(*packed)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip((*got, *got_p), (*eager, *eager_p), strict=True):
        assert torch.equal(a, b)


def test_backward_non_default_stream():
    args = _bwd_inputs(False)
    expected = torch.ops.vlmkern.cross_attention_backward(*args)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = torch.ops.vlmkern.cross_attention_backward(*args)
    stream.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_compile_fullgraph_backward_cuda():
    """G11: forward + backward under torch.compile(fullgraph, aot_eager): eager's gradients."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def loss(q, k, v):
        return vlmkern.ops.cross_attention(q, k, v).float().square().sum()

    fn = torch.compile(loss, fullgraph=True, backend=counter)
    for b in (1, 2, 3, 5):
        q, k, v = (t.cuda().requires_grad_() for t in make_qkv("bhsd", "fused", b, 33, 70, 8,
                                                              2, 64, torch.bfloat16))
        got = torch.autograd.grad(fn(q, k, v), (q, k, v))
        expected = torch.autograd.grad(loss(q, k, v), (q, k, v))
        assert all(torch.equal(a, e) for a, e in zip(got, expected, strict=True))
    assert counter.frame_count <= 2


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("sample", ["dense", "ranges", "packed"])
def test_opcheck_cuda(sample, requires_grad):
    """Schema, fake kernel (its CUDA-only checks included), autograd registration and AOT
    dispatch of the CUDA forward, with and without grad; the backward op and mllama_kv_ranges
    too."""
    q, k, v = (t.cuda() for t in make_qkv("bshd", "fused", 2, 70, 90, 4, 2, 72, torch.bfloat16))
    kw = [None, None, None, None, None, "zero"]
    if sample == "ranges":
        r = vlmkern.ops.mllama_kv_ranges(mllama_mask(2, 70, 1, 3), 30)
        kw = [r.cuda(), None, None, None, None, "uniform"]
    elif sample == "packed":
        q, k, v = (t.reshape(1, -1, *t.shape[2:]) for t in (q, k, v))
        cq = torch.tensor([0, 70, 140], dtype=torch.int32, device="cuda")
        ck = torch.tensor([0, 50, 180], dtype=torch.int32, device="cuda")
        kw = [None, cq, ck, None, None, "zero"]
    out, lse = torch.ops.vlmkern.cross_attention(q, k, v, *kw)
    if requires_grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.vlmkern.cross_attention.default, (q, k, v, *kw))
    torch.library.opcheck(torch.ops.vlmkern.cross_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                           torch.randn_like(lse), *kw))
    mask = mllama_mask(2, 9, 2, 2).cuda()
    torch.library.opcheck(torch.ops.vlmkern.mllama_kv_ranges.default, (mask, 7))


def test_compile_fullgraph_cuda():
    """torch.compile(fullgraph, aot_eager) over 4 batch sizes: eager's values, ≤ 2 compilations."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(vlmkern.ops.cross_attention, fullgraph=True, backend=counter)
    for b in (1, 2, 3, 5):
        q, k, v = (t.cuda() for t in make_qkv("bhsd", "fused", b, 33, 70, 8, 2, 64,
                                              torch.bfloat16))
        assert torch.equal(fn(q, k, v), vlmkern.ops.cross_attention(q, k, v))
    assert counter.frame_count <= 2
