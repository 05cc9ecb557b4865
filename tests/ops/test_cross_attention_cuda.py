"""CUDA cross_attention forward (flash-attention 2 kernel, csrc/cuda/kernels/cross_attention_*.cuh)
against the float64 reference by the bf16/fp16 "≤ 2× PyTorch's own error" rule (G3): every head
dim, GQA/MQA, Mllama ranges with dead rows in both masked-row modes, packed varlen with empty
segments, prefix-LM, Q-Former shared queries, Lk = 0, Lq = 1, fused-qkv and strided views; lse;
20× bit-identical repeats, CUDA graph capture, a non-default stream, a > 2^31-element case; the
CUDA-only errors (fp32, head dims, backward). All `gpu`: auto-skipped without CUDA."""

import pytest
import torch
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


def test_cuda_backward_raises():
    q, k, v = (t.cuda().requires_grad_() for t in make_qkv("bhsd", "contiguous", 1, 4, 6, 2, 1,
                                                            64, torch.bfloat16))
    out = vlmkern.ops.cross_attention(q, k, v)
    with pytest.raises(NotImplementedError, match=r"vlmkern.cross_attention_backward: CUDA "
                       r"backward not implemented yet"):
        out.sum().backward()


@pytest.mark.parametrize("sample", ["dense", "ranges", "packed"])
def test_opcheck_cuda(sample):
    """Schema, fake kernel (its CUDA-only checks included) and AOT dispatch of the CUDA forward
    (inputs without grad: the CUDA backward does not exist yet); mllama_kv_ranges too."""
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
    torch.library.opcheck(torch.ops.vlmkern.cross_attention.default, (q, k, v, *kw))
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
