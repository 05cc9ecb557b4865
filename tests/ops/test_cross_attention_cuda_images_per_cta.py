"""The CUDA cross_attention forward with several images per CTA (VLMKERN_XATTN_IMAGES_PER_CTA=n:
each CTA runs n (image, head) pairs one after the other, the Q-Former's broadcast queries loaded
once): the launched grid shrinks to ceil(B / n) (read from the profiler's trace) and the output
and lse are bit-identical to one image per CTA (each pass does the same arithmetic) for broadcast
and per-image queries, every head dim, B not a multiple of n, Mllama ranges in both masked-row
modes, prefix-LM and GQA; inputs it does not take (Sq past one window, split-KV) run one image per
CTA; a bad value raises; repeats and CUDA graph capture. All `gpu`."""

import json

import pytest
import torch
from test_cross_attention_cuda import HEAD_DIMS, _same_view_on_cuda, check_cuda
from test_cross_attention_cuda_small_q import check_repeats_and_graph_capture
from xattn_testing import make_qkv, mllama_mask

import vlmkern

pytestmark = pytest.mark.gpu


def fwd_grids(fn, tmp_path) -> list:
    """grid (x, y, z) of every cross_attention_fwd_kernel launched by fn(), from the profiler's
    Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    grids = [tuple(e["args"]["grid"]) for e in events
             if "cross_attention_fwd_kernel" in e.get("name", "") and "grid" in e.get("args", {})]
    assert grids, "no forward kernel in the trace"
    return grids


def check_same_bits(env, tmp_path, n, q, k, v, packs=True, **kw):
    """VLMKERN_XATTN_IMAGES_PER_CTA=n meets the float64 reference and gives one image per CTA's
    bits; packs: the grid has ceil(B / n) CTAs per head (else the B * windows of the default)."""
    env(images_per_cta=n)
    out, lse = check_cuda(q, k, v, **kw)
    qc, kc, vc = (_same_view_on_cuda(t) for t in (q, k, v))
    kwc = {a: t.cuda() if isinstance(t, torch.Tensor) else t for a, t in kw.items()}
    grids = fwd_grids(lambda: vlmkern.ops.cross_attention(qc, kc, vc, **kwc), tmp_path)
    env(images_per_cta=1)
    out1, lse1 = check_cuda(q, k, v, **kw)
    grids1 = fwd_grids(lambda: vlmkern.ops.cross_attention(qc, kc, vc, **kwc), tmp_path)
    assert torch.equal(out, out1) and torch.equal(lse, lse1)
    batch = q.shape[0]
    if packs:
        assert [g[0] for g in grids] == [-(-batch // n)] and grids1[0][0] == batch, grids
    else:
        assert grids == grids1


@pytest.mark.parametrize("n", [2, 4, 8, 64])
def test_qformer_broadcast_queries(n, env, tmp_path):
    """BLIP-2 shape: 32 broadcast queries x 257 keys x 12 heads, 37 images (a short last CTA)."""
    q, k, v = make_qkv("bshd", "expanded_q", 37, 32, 257, 12, 12, 64, torch.bfloat16)
    check_same_bits(env, tmp_path, n, q, k, v, layout="bshd")


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("memory", ["expanded_q", "fused"])
def test_head_dims_and_per_image_queries(memory, D, env, tmp_path):
    """fp16, every head dim; fused: each image's own queries (the Q tile reloaded per pass)."""
    q, k, v = make_qkv("bhsd", memory, 5, 7, 130, 4, 2, D, torch.float16)
    check_same_bits(env, tmp_path, 3, q, k, v)


@pytest.mark.parametrize("masked_rows", ["zero", "uniform"])
def test_mllama_ranges(masked_rows, env, tmp_path):
    q, k, v = make_qkv("bshd", "fused", 5, 20, 160, 4, 2, 128, torch.bfloat16)
    ranges = vlmkern.ops.mllama_kv_ranges(mllama_mask(5, 20, 2, 2, seed=3), 40)
    check_same_bits(env, tmp_path, 2, q, k, v, kv_ranges=ranges, masked_rows=masked_rows,
                    layout="bshd")


def test_prefix_lm_64_row_windows(env, tmp_path):
    """Sq = 50 runs 64-row CTAs of 4 warps, one window per image: packed too."""
    q, k, v = make_qkv("bshd", "fused", 3, 50, 130, 2, 1, 80, torch.bfloat16)
    check_same_bits(env, tmp_path, 2, q, k, v, mode="prefix_lm",
                    prefix_len=torch.tensor([3, 0, 49]), layout="bshd")


def test_inputs_it_does_not_take(env, tmp_path):
    """Sq = 70 (two windows per image) and forced split-KV run one image per CTA."""
    q, k, v = make_qkv("bshd", "fused", 3, 70, 130, 2, 1, 64, torch.bfloat16)
    check_same_bits(env, tmp_path, 4, q, k, v, packs=False, layout="bshd")
    env(splits=3)
    q, k, v = make_qkv("bshd", "expanded_q", 3, 32, 700, 4, 4, 64, torch.bfloat16)
    check_same_bits(env, tmp_path, 2, q, k, v, packs=False, layout="bshd")


def test_bad_value(env):
    q, k, v = (t.cuda() for t in make_qkv("bshd", "contiguous", 2, 8, 64, 2, 2, 64,
                                          torch.bfloat16))
    for bad in ("0", "65", "two"):
        env(images_per_cta=bad)
        with pytest.raises(RuntimeError, match="VLMKERN_XATTN_IMAGES_PER_CTA must be an integer"):
            vlmkern.ops.cross_attention(q, k, v, layout="bshd")


def test_repeats_and_graph_capture(env):
    env(images_per_cta=4)
    check_repeats_and_graph_capture(*(t.cuda() for t in make_qkv(
        "bshd", "expanded_q", 9, 32, 257, 12, 12, 64, torch.bfloat16)))
