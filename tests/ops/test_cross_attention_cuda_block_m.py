"""The CUDA cross_attention forward's 128-row CTAs (8 warps, head-dim pads 64 / 96 / 128), run only
when VLMKERN_XATTN_BLOCK_M=128 forces them: each head dim and dtype against the float64 reference;
bit-identical to the 64-row kernel without split-KV on Mllama-like ranges (both masked-row modes,
partial last windows), prefix-LM, packed segments crossing 128-row windows and a decode GQA step;
forced split-KV, the backward on its output, repeats and CUDA graph capture; which kernel ran, read
from the profiler; the automatic pick never takes 128; the env var's errors. All `gpu`."""

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
def test_forced_splits(masked_rows, env):
    """Split-KV 3 over 128-row windows, even rows dead: partials + combine."""
    env(block_m=128, splits=3)
    q, k, v = make_qkv("bhsd", "fused", 2, 130, 700, 8, 2, 128, torch.bfloat16)
    ranges = torch.tensor([[0, 0], [90, 650]], dtype=torch.int32)[torch.arange(130) % 2]
    kw = {"kv_ranges": ranges[:, None].expand(2, 130, 1, 2), "masked_rows": masked_rows}
    out, lse = check_cuda(q, k, v, **kw)
    if masked_rows == "zero":
        assert out[:, :, ::2].eq(0).all() and torch.isneginf(lse[:, :, ::2]).all()
    qc, kc, vc = (t.cuda() for t in (q, k, v))
    names = profiled_names(lambda: vlmkern.ops.cross_attention(qc, kc, vc))
    assert any("cross_attention_combine_kernel" in n for n in names)
    assert ran_warps(q, k, v) == {8}


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
