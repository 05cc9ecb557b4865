"""rope_cos_sin / rope_cos_sin_backward (HF's calling convention: given cos, sin tables) on every
device: forward and backward against the float64 reference, partial rotary (R < D), cos batch 1
vs B, cos in another dtype than q, opcheck, gradcheck. sin halves differ from each other on
purpose, so a swapped or unnegated half in the backward cannot pass."""

import pytest
import torch
from testing_utils import assert_nontrivial

import vlmkern
from vlmkern import reference

cos_sin_op = torch.ops.vlmkern.rope_cos_sin
cos_sin_backward_op = torch.ops.vlmkern.rope_cos_sin_backward


def _tables(cos_batch, s, r, dtype, device):
    """(cos_batch, S, R) cos and sin with unrelated halves (not a real rotation table), values
    exact in fp32 (the op reads tables as fp32), so fp64 q is checked at fp64 precision."""
    cos = torch.rand(cos_batch, s, r) * 2 - 1
    sin = torch.rand(cos_batch, s, r) * 2 - 1
    return cos.to(device, dtype), sin.to(device, dtype)


def _rotate64(q, k, cos, sin):
    """The float64 reference on (B, S, H, D) q, k (unsqueeze_dim=2)."""
    return reference.apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double(),
                                          unsqueeze_dim=2)


CASES = [  # (B, S, Hq, Hk, D, R, cos batch)
    (2, 5, 3, 1, 16, 16, 2),
    (2, 5, 3, 1, 16, 12, 1),  # partial rotary, one table for the batch
    (1, 113, 4, 2, 80, 80, 1),
    (3, 7, 2, 2, 72, 40, 3),
    (1, 1, 1, 1, 2, 2, 1),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_forward_and_backward_match_reference(device, case, dtype):
    b, s, hq, hk, d, r, cb = case
    q = torch.randn(b, s, hq, d, dtype=torch.float64).to(device, dtype)
    k = torch.randn(b, s, hk, d, dtype=torch.float64).to(device, dtype)
    cos, sin = _tables(cb, s, r, torch.float32 if dtype != torch.float64 else dtype, device)
    ref_q, ref_k = _rotate64(q, k, cos, sin)
    assert_nontrivial(ref_q)
    out_q, out_k = cos_sin_op(q, k, cos, sin)
    # fp32 math (fp64 for fp64 q), one rounding to the output dtype: within an ulp or two.
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
    for out, ref in ((out_q, ref_q), (out_k, ref_k)):
        assert out.dtype == dtype
        torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=tol[dtype], atol=tol[dtype])

    # backward: the transpose of the rotation, through autograd of the public wrapper
    gq = torch.randn_like(out_q, dtype=torch.float64).to(dtype)
    gk = torch.randn_like(out_k, dtype=torch.float64).to(dtype)
    q64 = q.double().requires_grad_()
    k64 = k.double().requires_grad_()
    rq, rk = _rotate64(q64, k64, cos, sin)
    ref_gq, ref_gk = torch.autograd.grad((rq, rk), (q64, k64), (gq.double(), gk.double()))
    back_q, back_k = cos_sin_backward_op(gq, gk, cos, sin)
    for out, ref in ((back_q, ref_gq), (back_k, ref_gk)):
        torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=tol[dtype], atol=tol[dtype])


def test_cos_in_bfloat16_with_fp32_q(device):
    """HF text models pass cos/sin in the model dtype; any float dtype is read as is."""
    q, k = torch.randn(1, 6, 2, 8, device=device), torch.randn(1, 6, 1, 8, device=device)
    cos, sin = _tables(1, 6, 8, torch.bfloat16, device)
    out_q, _ = cos_sin_op(q, k, cos, sin)
    ref_q, _ = _rotate64(q, k, cos, sin)
    torch.testing.assert_close(out_q.double(), ref_q, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_wrapper_autograd_matches_reference(device, unsqueeze_dim):
    qs = (2, 3, 5, 16) if unsqueeze_dim == 1 else (2, 5, 3, 16)
    ks = (2, 1, 5, 16) if unsqueeze_dim == 1 else (2, 5, 1, 16)
    q = torch.randn(qs, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(ks, dtype=torch.float64, device=device, requires_grad=True)
    cos, sin = _tables(2, 5, 12, torch.float64, device)
    out = vlmkern.ops.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    ref = reference.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    grads = [torch.randn_like(o) for o in out]
    got = torch.autograd.grad(out, (q, k), grads)
    want = torch.autograd.grad(ref, (q, k), grads)
    for a, b in zip((*out, *got), (*ref, *want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_cpu():
    q = torch.randn(2, 4, 3, 10, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 1, 10, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables(1, 4, 8, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda a, b: cos_sin_op(a, b, cos, sin), (q, k))
    assert torch.autograd.gradgradcheck(lambda a, b: cos_sin_op(a, b, cos, sin), (q, k))


def _opcheck_samples(device):
    cos, sin = _tables(2, 5, 12, torch.float32, device)
    fused = torch.randn(2, 5, 4, 16, device=device)  # q, k as views of one fused tensor
    yield fused[:, :, :3], fused[:, :, 3:], cos, sin
    yield torch.randn(2, 5, 3, 16, device=device, requires_grad=True), \
        torch.randn(2, 5, 1, 16, device=device, requires_grad=True), cos, sin
    c1, s1 = _tables(1, 5, 16, torch.bfloat16, device)
    yield torch.randn(0, 5, 2, 16, device=device, dtype=torch.bfloat16), \
        torch.randn(0, 5, 1, 16, device=device, dtype=torch.bfloat16), c1, s1
    yield torch.randn(2, 5, 2, 16, device=device, dtype=torch.float16, requires_grad=True), \
        torch.randn(2, 5, 2, 32, device=device, dtype=torch.float16)[..., ::2], c1, s1


@pytest.mark.parametrize("op", [cos_sin_op, cos_sin_backward_op], ids=["fwd", "bwd"])
def test_opcheck(device, op):
    for sample in _opcheck_samples(device):
        torch.library.opcheck(op, sample)
