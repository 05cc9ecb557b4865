"""The CUDA cross_attention forward's 128-row CTAs, run only when forced: 8 warps x 16 rows
(VLMKERN_XATTN_BLOCK_M=128, head-dim pads 64 / 96 / 128) and 4 warps x 32 rows
(VLMKERN_XATTN_WARP_ROWS=32, every head dim): each head dim and dtype against the float64
reference; bit-identical to the 64-row kernel without split-KV on Mllama-like ranges (both
masked-row modes, partial last windows), prefix-LM, packed segments crossing 128-row windows and a
decode GQA step; forced split-KV, the backward on its output, repeats and CUDA graph capture; which
kernel ran, read from the profiler; the automatic pick never takes 128; the env vars' errors. All
`gpu`."""

import pytest
import torch
from test_cross_attention_cuda import LOWP, check_cuda, check_cuda_backward
from test_cross_attention_cuda_small_q import (
    check_repeats_and_graph_capture,
    check_same_bits_as_64_rows,
    ran_warps,
)
from testing_utils import profiled_names
from xattn_testing import make_qkv, mllama_mask

import vlmkern

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("D", [64, 96, 128])
def test_head_dims(D, dtype, env):
    """Sq 130 (the second window holds 2 rows) x 200 keys, 8 q / 2 kv heads."""
    env(block_m=128)
    q, k, v = make_qkv("bhsd", "fused", 2, 130, 200, 8, 2, D, dtype)
    check_cuda(q, k, v)
    assert ran_warps(q, k, v) == {8}


def _mllama(masked_rows):
    """Llama-3.2-Vision-like: 8 q / 2 kv heads (GQA 4) x 128, two 1-tile images of 1601 keys,
    Sq 300 (windows 128 + 128 + 44), rows that see nothing."""
    q, k, v = make_qkv("bshd", "fused", 2, 300, 2 * 1601, 8, 2, 128, torch.bfloat16)
    ranges = vlmkern.ops.mllama_kv_ranges(mllama_mask(2, 300, 2, 1, seed=7, dead_rows=5), 1601)
    return q, k, v, {"kv_ranges": ranges, "masked_rows": masked_rows, "layout": "bshd"}


def _packed():
    """Segments crossing the 128-row windows (rows 100..140, 200..262), an empty one, one
    without keys; fp16, D 96."""
    cq = torch.tensor([0, 3, 3, 100, 140, 200, 262, 300], dtype=torch.int32)
    ck = torch.tensor([0, 10, 15, 15, 80, 290, 350, 420], dtype=torch.int32)
    q = torch.randn(300, 4, 96).to(torch.float16)
    k, v = (torch.randn(420, 2, 96).to(torch.float16) for _ in range(2))
    return q, k, v, {"cu_seqlens_q": cq, "cu_seqlens_k": ck}


def _prefix():
    q, k, v = make_qkv("bshd", "fused", 2, 300, 300, 4, 1, 64, torch.bfloat16)
    return q, k, v, {"layout": "bshd", "mode": "prefix_lm", "prefix_len": torch.tensor([3, 200])}


# q, k, v, kwargs
CASES = {
    "mllama ranges zero": lambda: _mllama("zero"),
    "mllama ranges uniform": lambda: _mllama("uniform"),
    "prefix-LM": _prefix,
    "packed": _packed,
    "decode GQA": lambda: (*make_qkv("bshd", "fused", 3, 1, 700, 32, 8, 128, torch.bfloat16),
                           {"layout": "bshd"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bit_identical_to_64_rows(case, env):
    torch.manual_seed(0)
    q, k, v, kw = CASES[case]()
    check_same_bits_as_64_rows(env, 128, q, k, v, **kw)


@pytest.mark.parametrize("masked_rows", ["zero", "uniform"])
@pytest.mark.parametrize("keys", [700, 100])  # 100: 2 key tiles in 3 runs, one run empty
@pytest.mark.parametrize("shape", [8, "4x32"])
def test_forced_splits(shape, keys, masked_rows, env):
    """Split-KV 3 over 128-row windows (8 warps x 16 rows, 4 warps x 32), even rows dead:
    partials + combine."""
    env(splits=3, **({"block_m": 128} if shape == 8 else {"warp_rows": 32}))
    q, k, v = make_qkv("bhsd", "fused", 2, 130, keys, 8, 2, 128, torch.bfloat16)
    ranges = torch.tensor([[0, 0], [9, keys - 5]], dtype=torch.int32)[torch.arange(130) % 2]
    kw = {"kv_ranges": ranges[:, None].expand(2, 130, 1, 2), "masked_rows": masked_rows}
    out, lse = check_cuda(q, k, v, **kw)
    if masked_rows == "zero":
        assert out[:, :, ::2].eq(0).all() and torch.isneginf(lse[:, :, ::2]).all()
    qc, kc, vc = (t.cuda() for t in (q, k, v))
    names = profiled_names(lambda: vlmkern.ops.cross_attention(qc, kc, vc))
    assert any("cross_attention_combine_kernel" in n for n in names)
    assert ran_warps(q, k, v) == {shape}


def test_automatic_pick_is_never_128(env):
    q, k, v = make_qkv("bhsd", "fused", 1, 1024, 300, 8, 2, 128, torch.bfloat16)
    assert ran_warps(q, k, v) == {4}


def test_backward_on_128_row_forward(env):
    env(block_m=128)
    q, k, v = make_qkv("bshd", "fused", 2, 130, 257, 8, 2, 128, torch.bfloat16)
    check_cuda_backward(q, k, v, grad_lse=True, layout="bshd")


def test_repeats_and_graph_capture(env):
    env(block_m=128)
    check_repeats_and_graph_capture(*(t.cuda() for t in make_qkv(
        "bshd", "fused", 2, 300, 500, 8, 2, 128, torch.bfloat16)))


@pytest.mark.parametrize("bad", ["16", "256", "thirty-two", "32 ", "128 "])
def test_bad_env_value(bad, env):
    env(block_m=bad)
    q, k, v = (t.cuda() for t in make_qkv("bhsd", "contiguous", 1, 3, 90, 2, 1, 64,
                                          torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"VLMKERN_XATTN_BLOCK_M must be 32, 64 or 128"):
        vlmkern.ops.cross_attention(q, k, v)


@pytest.mark.parametrize("Sq", [1, 70])  # 1: a decode GQA step, run as rows
@pytest.mark.parametrize("D", [72, 80])
def test_128_rows_unsupported_head_dim(D, Sq, env):
    env(block_m=128)
    q, k, v = (t.cuda() for t in make_qkv("bhsd", "contiguous", 1, Sq, 90, 4, 2, D,
                                          torch.bfloat16))
    with pytest.raises(RuntimeError,
                       match=rf"VLMKERN_XATTN_BLOCK_M=128 takes head dims 64, 96 and 128 only, "
                             rf"got head dim {D}"):
        vlmkern.ops.cross_attention(q, k, v)


# ---- 4 warps x 32 rows (kMT = 2): VLMKERN_XATTN_WARP_ROWS=32 ---------------------------------

@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("D", [64, 72, 80, 96, 128])
def test_warp_rows_32_head_dims(D, dtype, env):
    """Sq 130 (the second window holds 2 rows) x 200 keys, 8 q / 2 kv heads."""
    env(warp_rows=32)
    q, k, v = make_qkv("bhsd", "fused", 2, 130, 200, 8, 2, D, dtype)
    check_cuda(q, k, v)
    assert ran_warps(q, k, v) == {"4x32"}


@pytest.mark.parametrize("case", list(CASES))
def test_warp_rows_32_bit_identical_to_64_rows(case, env):
    """As check_same_bits_as_64_rows: a row's result does not depend on its CTA's other rows, so
    the 32-row warps (visibility bits from the thread owning each row) give the 64-row bits."""
    torch.manual_seed(0)
    q, k, v, kw = CASES[case]()
    env(splits=1, warp_rows=32)
    out, lse = check_cuda(q, k, v, **kw)
    assert ran_warps(q, k, v, **kw) == {"4x32"}
    env(warp_rows=16, block_m=64)
    out64, lse64 = check_cuda(q, k, v, **kw)
    assert ran_warps(q, k, v, **kw) == {4}
    assert torch.equal(out, out64) and torch.equal(lse, lse64)


def test_warp_rows_32_backward_and_graph_capture(env):
    env(warp_rows=32)
    q, k, v = make_qkv("bshd", "fused", 2, 130, 257, 8, 2, 128, torch.bfloat16)
    check_cuda_backward(q, k, v, grad_lse=True, layout="bshd")
    check_repeats_and_graph_capture(*(t.cuda() for t in make_qkv(
        "bshd", "fused", 2, 300, 500, 8, 2, 80, torch.bfloat16)))


@pytest.mark.parametrize(("warp_rows", "block_m", "shape"),
                         [("32", "128", "4x32"), ("16", "128", 8), ("16", None, 4)])
def test_warp_rows_env_values(warp_rows, block_m, shape, env):
    env(warp_rows=warp_rows, **({"block_m": block_m} if block_m else {}))
    q, k, v = make_qkv("bhsd", "fused", 1, 200, 150, 4, 2, 64, torch.bfloat16)
    assert ran_warps(q, k, v) == {shape}


def test_warp_rows_16_keeps_the_8_warp_head_dims(env):
    env(warp_rows=16, block_m=128)
    q, k, v = (t.cuda() for t in make_qkv("bhsd", "contiguous", 1, 70, 90, 4, 2, 80,
                                          torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"VLMKERN_XATTN_BLOCK_M=128 takes head dims 64, 96"):
        vlmkern.ops.cross_attention(q, k, v)


@pytest.mark.parametrize(("warp_rows", "block_m", "match"), [
    ("64", None, r"VLMKERN_XATTN_WARP_ROWS must be 16 or 32, got '64'"),
    ("32", "64", r"VLMKERN_XATTN_WARP_ROWS=32 runs 128-row CTAs; VLMKERN_XATTN_BLOCK_M is '64'"),
])
def test_warp_rows_bad_env(warp_rows, block_m, match, env):
    env(warp_rows=warp_rows, **({"block_m": block_m} if block_m else {}))
    q, k, v = (t.cuda() for t in make_qkv("bhsd", "contiguous", 1, 3, 90, 2, 1, 64,
                                          torch.bfloat16))
    with pytest.raises(RuntimeError, match=match):
        vlmkern.ops.cross_attention(q, k, v)
