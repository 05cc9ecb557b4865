"""The CUDA cross_attention forward's 32-row CTAs (2 warps; the glue's pick when a window holds
<= 32 query rows: Q-Former / Perceiver learned queries, decode, decode GQA rows): Sq 1 / 7 / 32
with batch-stride-0 queries at every head dim against the float64 reference; bit-identical to the
64-row kernel (VLMKERN_XATTN_BLOCK_M) for dense, Mllama ranges, prefix-LM, packed and decode GQA
input, Sq > 32 forced included; split-KV, the backward on its output, repeats and CUDA graph
capture; which kernel ran, read from the profiler. All `gpu` (the `env` fixture: conftest.py; the
env var's errors: test_cross_attention_cuda_block_m.py)."""

import re

import pytest
import torch
from test_cross_attention_cuda import (
    HEAD_DIMS,
    LOWP,
    _same_view_on_cuda,
    check_cuda,
    check_cuda_backward,
)
from testing_utils import profiled_names
from xattn_testing import make_qkv, mllama_mask

import vlmkern

pytestmark = pytest.mark.gpu


def fwd_warps(fn) -> set:
    """The CTA shape of every cross_attention_fwd_kernel<T, kHeadDimPad, kWarps, kMT> launched by
    fn(), from the profiler's kernel names (demangled, or mangled: ...ILi64ELi2ELi1EEEv...):
    kWarps for 16 rows per warp (kMT = 1), "4x32" for 4 warps of 32 rows (kMT = 2)."""
    shapes = set()
    for name in profiled_names(fn):
        if m := re.search(r"cross_attention_fwd_kernel<[^,>]*,([^>]*)>", name):
            nums = [int(x) for x in re.findall(r"\d+", m[1])]  # pad, warps[, m tiles]
        elif m := re.search(r"cross_attention_fwd_kernelI\w*?Li(\d+)ELi(\d+)E(?:Li(\d+)E)?",
                            name):
            nums = [int(x) for x in m.groups() if x is not None]
        else:
            continue
        warps, mt = nums[1], nums[2] if len(nums) > 2 else 1
        shapes.add(warps if mt == 1 else f"{warps}x{16 * mt}")
    assert shapes, "no forward kernel in the profile"
    return shapes


def ran_warps(q, k, v, **kw) -> set:
    qc, kc, vc = (_same_view_on_cuda(t) for t in (q, k, v))
    kwc = {n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    return fwd_warps(lambda: vlmkern.ops.cross_attention(qc, kc, vc, **kwc))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("Sq", [1, 7, 32])
def test_shared_queries(Sq, D, dtype, env):
    """Q-Former-like: Sq learned queries (batch stride 0) x 257 keys (the last tile holds one
    key) x 12 heads x 5 images, on the 32-row kernel without any switch."""
    q, k, v = make_qkv("bshd", "expanded_q", 5, Sq, 257, 12, 12, D, dtype)
    assert q.stride(0) == 0
    check_cuda(q, k, v, layout="bshd")
    assert ran_warps(q, k, v, layout="bshd") == {2}


@pytest.mark.parametrize(("Sq", "warps"), [(32, 2), (33, 4), (64, 4)])
def test_automatic_pick(Sq, warps, env):
    q, k, v = make_qkv("bhsd", "expanded_q", 2, Sq, 100, 4, 4, 64, torch.bfloat16)
    assert ran_warps(q, k, v) == {warps}


def test_decode_gqa_rows_pick_32_rows(env):
    """Sq = 1, 32 q / 8 kv heads: the forward runs 4 rows (the group) per kv head."""
    q, k, v = make_qkv("bhsd", "fused", 2, 1, 300, 32, 8, 128, torch.bfloat16)
    check_cuda(q, k, v)
    assert ran_warps(q, k, v) == {2}


def _packed():
    cq = torch.tensor([0, 3, 3, 40, 45, 100], dtype=torch.int32)
    ck = torch.tensor([0, 10, 15, 15, 80, 90], dtype=torch.int32)
    q = torch.randn(100, 2, 64).to(torch.bfloat16)
    k, v = (torch.randn(90, 1, 64).to(torch.bfloat16) for _ in range(2))
    return q, k, v, {"cu_seqlens_q": cq, "cu_seqlens_k": ck}


def _ranges(masked_rows):
    q, k, v = make_qkv("bshd", "fused", 2, 20, 160, 4, 2, 128, torch.bfloat16)
    ranges = vlmkern.ops.mllama_kv_ranges(mllama_mask(2, 20, 2, 2, seed=3), 40)
    return q, k, v, {"kv_ranges": ranges, "masked_rows": masked_rows, "layout": "bshd"}


def _dense(memory, B, Sq, Sk, Hq, Hk, D, **kw):
    return *make_qkv("bshd", memory, B, Sq, Sk, Hq, Hk, D, torch.bfloat16), dict(kw, layout="bshd")


# q, k, v, kwargs: Sq <= 32 (the automatic pick) and Sq > 32 (only when forced).
CASES = {
    "dense Sq=32": lambda: _dense("expanded_q", 3, 32, 257, 4, 4, 64),
    "dense Sq=70": lambda: _dense("fused", 2, 70, 300, 4, 2, 80),
    "ranges zero": lambda: _ranges("zero"),
    "ranges uniform": lambda: _ranges("uniform"),
    "prefix-LM Sq=7": lambda: _dense("fused", 2, 7, 130, 2, 1, 64, mode="prefix_lm",
                                     prefix_len=torch.tensor([3, 0])),
    "prefix-LM Sq=70": lambda: _dense("fused", 2, 70, 130, 2, 1, 64, mode="prefix_lm",
                                      prefix_len=torch.tensor([3, 0])),
    "packed": _packed,
    "decode GQA": lambda: _dense("fused", 3, 1, 700, 12, 3, 96),
}


def check_same_bits_as_64_rows(env, block_m, q, k, v, **kw):
    """Forced block_m-row CTAs (split-KV off) meet the reference, ran with block_m / 16 warps,
    and give the 64-row kernel's bits: without split-KV a row's result does not depend on the
    CTA's other rows (tiles only one of the windows loads are fully masked for this row: p = 0,
    alpha = 1)."""
    env(splits=1, block_m=block_m)
    out, lse = check_cuda(q, k, v, **kw)
    assert ran_warps(q, k, v, **kw) == {block_m // 16}
    env(block_m=64)
    out64, lse64 = check_cuda(q, k, v, **kw)
    assert ran_warps(q, k, v, **kw) == {4}
    assert torch.equal(out, out64) and torch.equal(lse, lse64)


@pytest.mark.parametrize("case", list(CASES))
def test_bit_identical_to_64_rows(case, env):
    torch.manual_seed(0)
    q, k, v, kw = CASES[case]()
    check_same_bits_as_64_rows(env, 32, q, k, v, **kw)


@pytest.mark.parametrize("masked_rows", ["zero", "uniform"])
@pytest.mark.parametrize("n", [3, 16])  # 16 > 11 key tiles: some runs are empty
def test_forced_splits(n, masked_rows, env):
    env(splits=n)
    q, k, v = make_qkv("bhsd", "expanded_q", 3, 32, 700, 4, 4, 64, torch.float16)
    check_cuda(q, k, v)
    ranges = torch.tensor([[0, 0], [90, 650]], dtype=torch.int32)[torch.arange(32) % 2]
    out, lse = check_cuda(q, k, v, kv_ranges=ranges[:, None].expand(3, 32, 1, 2),
                          masked_rows=masked_rows)  # even rows see nothing
    if masked_rows == "zero":
        assert out[:, :, ::2].eq(0).all() and torch.isneginf(lse[:, :, ::2]).all()
    assert ran_warps(q, k, v) == {2}


def test_decode_heuristic_splits_on_32_rows(env):
    """The automatic split-KV of a long decode step (B 1, 32 q / 8 kv heads, 6404 keys) runs on
    the 32-row kernel: partials + combine."""
    q, k, v = make_qkv("bhsd", "fused", 1, 1, 6404, 32, 8, 128, torch.bfloat16)
    check_cuda(q, k, v)
    qc, kc, vc = (t.cuda() for t in (q, k, v))
    names = profiled_names(lambda: vlmkern.ops.cross_attention(qc, kc, vc))
    if torch.cuda.get_device_properties(0).multi_processor_count >= 100:  # H100 / H200-sized
        assert any("cross_attention_combine_kernel" in n for n in names)
    assert fwd_warps(lambda: vlmkern.ops.cross_attention(qc, kc, vc)) == {2}


def test_backward_on_32_row_forward(env):
    """BLIP-2 Q-Former training: out / lse saved by the 32-row forward feed the backward."""
    q, k, v = make_qkv("bshd", "expanded_q", 8, 32, 257, 12, 12, 64, torch.bfloat16)
    check_cuda_backward(q, k, v, grad_lse=True, layout="bshd")


def check_repeats_and_graph_capture(q, k, v):
    """20 repeats of the forward (bshd CUDA tensors) give the same bits, and so does a CUDA graph
    replay."""
    eager = vlmkern.ops.cross_attention(q, k, v, layout="bshd", return_lse=True)
    for _ in range(20):
        again = vlmkern.ops.cross_attention(q, k, v, layout="bshd", return_lse=True)
        assert torch.equal(again[0], eager[0]) and torch.equal(again[1], eager[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = vlmkern.ops.cross_attention(q, k, v, layout="bshd")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, eager[0])


def test_repeats_and_graph_capture(env):
    check_repeats_and_graph_capture(*(t.cuda() for t in make_qkv(
        "bshd", "expanded_q", 4, 32, 257, 12, 12, 64, torch.bfloat16)))
