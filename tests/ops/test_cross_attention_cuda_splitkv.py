"""Split-KV CUDA cross_attention forward (grid.z runs of key tiles + the combine kernel): forced
run counts (VLMKERN_XATTN_SPLITS) against the float64 reference for dense, Mllama ranges with dead
rows in both masked-row modes (empty runs included), prefix-LM, GQA and every head dim; the
heuristic on decode shapes; CUDA-graph capture; the env var's errors. All `gpu`."""

import pytest
import torch
from test_cross_attention_cuda import HEAD_DIMS, check_cuda
from xattn_testing import make_qkv, mllama_mask

import vlmkern

pytestmark = pytest.mark.gpu


@pytest.fixture
def splits(monkeypatch):
    def set_(n):
        monkeypatch.setenv("VLMKERN_XATTN_SPLITS", str(n))

    return set_


@pytest.mark.parametrize("n", [2, 3, 16])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_dense_forced_splits(D, n, splits):
    splits(n)
    q, k, v = make_qkv("bhsd", "fused", 2, 70, 300, 4, 2, D, torch.bfloat16)  # 5 key tiles
    check_cuda(q, k, v)


@pytest.mark.parametrize("masked_rows", ["zero", "uniform"])
@pytest.mark.parametrize("n", [2, 7])  # 7 > 5 key tiles: some runs are empty
def test_mllama_ranges_forced_splits(n, masked_rows, splits):
    splits(n)
    B, S, M, T, nvt = 2, 140, 2, 4, 33
    mask = mllama_mask(B, S, M, T)
    ranges = vlmkern.ops.mllama_kv_ranges(mask, nvt)
    q, k, v = make_qkv("bhsd", "fused", B, S, M * T * nvt, 8, 2, 128, torch.float16)
    out, lse = check_cuda(q, k, v, kv_ranges=ranges, masked_rows=masked_rows)
    dead = (mask != 1).flatten(2).all(-1)
    assert dead.any()
    if masked_rows == "zero":
        assert out.transpose(1, 2)[dead].eq(0).all()
        assert torch.isneginf(lse.transpose(1, 2)[dead]).all()


def test_prefix_lm_and_all_dead_forced_splits(splits):
    splits(3)
    q, k, v = make_qkv("bhsd", "contiguous", 2, 70, 200, 2, 1, 64, torch.bfloat16)
    check_cuda(q, k, v, mode="prefix_lm", prefix_len=torch.tensor([3, 0]))
    out, lse = check_cuda(q, k, v, kv_ranges=torch.zeros(2, 70, 1, 2, dtype=torch.int32))
    assert out.eq(0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("B", [1, 4])
def test_decode_heuristic(B):
    """One query row per sequence, 32 q / 8 kv heads x 6404 keys: the heuristic splits here."""
    q, k, v = make_qkv("bhsd", "fused", B, 1, 6404, 32, 8, 128, torch.bfloat16)
    check_cuda(q, k, v)


def test_split_graph_capture_and_repeats(splits):
    splits(4)
    q, k, v = (t.cuda() for t in make_qkv("bhsd", "contiguous", 1, 3, 900, 8, 2, 64,
                                          torch.bfloat16))
    eager = vlmkern.ops.cross_attention(q, k, v)
    for _ in range(5):
        assert torch.equal(vlmkern.ops.cross_attention(q, k, v), eager)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        vlmkern.ops.cross_attention(q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = vlmkern.ops.cross_attention(q, k, v)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, eager)


@pytest.mark.parametrize("bad", ["0", "65", "two", "2x"])
def test_bad_env_value(bad, splits):
    splits(bad)
    q, k, v = (t.cuda() for t in make_qkv("bhsd", "contiguous", 1, 3, 90, 2, 1, 64,
                                          torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"VLMKERN_XATTN_SPLITS must be an integer in \[1, 64\]"):
        vlmkern.ops.cross_attention(q, k, v)
