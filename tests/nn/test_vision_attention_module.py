"""vlmkern.nn.QwenVisionAttention against HF's Qwen2-VL ViT attention: one segment (SDPA), several
segments (one packed cross_attention), gradients, low precision, and the SDPA composite used where
the CUDA kernels do not run, checked against the op."""

import pytest
import torch

from vlmkern import nn as vnn
from vlmkern.nn.vision_attention import _sdpa_segments
from vlmkern.ops import cross_attention

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention  # noqa: E402

DIM, HEADS = 160, 2  # head dim 80, Qwen2-VL's


def _pair(dtype=torch.float32):
    cfg = Qwen2VLVisionConfig(embed_dim=DIM, num_heads=HEADS)
    cfg._attn_implementation = "sdpa"
    hf = VisionAttention(cfg).to(dtype)
    ours = vnn.QwenVisionAttention(DIM, HEADS).to(dtype)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _inputs(lengths, dtype=torch.float32):
    n = sum(lengths)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    angles = torch.randn(n, DIM // HEADS // 2)
    emb = torch.cat([angles, angles], -1)
    return torch.randn(n, DIM, dtype=dtype), cu, (emb.cos(), emb.sin())


@pytest.mark.parametrize("lengths", [[37], [16, 5, 30], [1, 1, 64]])
def test_matches_hf_forward_and_backward(lengths):
    hf, ours = _pair()
    x, cu, pe = _inputs(lengths)
    outs, grads = [], []
    for m in (hf, ours):
        xi = x.clone().requires_grad_()
        out = m(xi, cu_seqlens=cu, position_embeddings=pe)
        out.square().sum().backward()
        outs.append(out)
        grads.append([xi.grad, *(p.grad for p in m.parameters())])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for g_ours, g_hf in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_ours, g_hf, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_hfs_error(dtype):
    hf, ours = _pair()
    x, cu, pe = _inputs([24, 40, 9])
    with torch.no_grad():
        ref = hf.double()(x.double(), cu_seqlens=cu, position_embeddings=pe)
        hf.to(dtype)
        ours.to(dtype)
        hf_err = (hf(x.to(dtype), cu_seqlens=cu, position_embeddings=pe).double() - ref).abs()
        vk_err = (ours(x.to(dtype), cu_seqlens=cu, position_embeddings=pe).double() - ref).abs()
    assert vk_err.max() <= 2 * hf_err.max() + 1e-6


def test_sdpa_composite_matches_the_op():
    q, k, v = (torch.randn(50, 3, 24) for _ in range(3))
    cu = torch.tensor([0, 7, 7, 30, 50], dtype=torch.int32)  # an empty segment too
    want = cross_attention(q, k, v, scale=0.2, cu_seqlens_q=cu, cu_seqlens_k=cu)
    torch.testing.assert_close(_sdpa_segments(q, k, v, cu, 0.2), want, rtol=1e-5, atol=1e-5)
    padded = torch.cat([cu, cu[-1:].repeat(50)])  # vision_grid's fixed length: empty to the end
    torch.testing.assert_close(_sdpa_segments(q, k, v, padded, 0.2), want, rtol=1e-5, atol=1e-5)


def test_sdpa_composite_calls_are_4d(monkeypatch):
    """One SDPA call per non-empty segment, 4-D (1, H, n, D) as HF's: CUDA's fused backends
    refuse 3-D inputs (the math backend would run instead)."""
    sdpa, shapes = torch.nn.functional.scaled_dot_product_attention, []

    def recorder(q, k, v, *args, **kw):
        shapes.append(tuple(q.shape))
        return sdpa(q, k, v, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorder)
    q, k, v = (torch.randn(50, 3, 24) for _ in range(3))
    for cu, lengths in (([0, 7, 7, 30, 50], (7, 23, 20)), ([0, 50], (50,))):
        shapes.clear()
        _sdpa_segments(q, k, v, torch.tensor(cu, dtype=torch.int32), 0.2)
        assert shapes == [(1, 3, n, 24) for n in lengths]
