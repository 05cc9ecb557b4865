"""Cross-attention test helpers: q/k/v in every layout and memory arrangement, Mllama-like tile
masks, and the two-tier numerics check (fp32 vs float64, bf16/fp16 vs PyTorch's own error)."""

import torch
from testing_utils import assert_nontrivial

import vlmkern
from vlmkern import reference

MEMORIES = ["contiguous", "fused", "strided_d", "offset", "expanded_q"]


def _randn(shape, dtype, device="cpu"):
    return torch.randn(shape, device=device).to(dtype)


def make_qkv(layout, memory, B, Sq, Sk, Hq, Hk, D, dtype, device="cpu"):
    """q (Hq heads), k, v (Hk heads) in `layout` ("bhsd" / "bshd"), laid out as `memory` says:
    fused = views of a q projection and a fused kv projection (HF: view + transpose), strided_d =
    stride-2 head dim, offset = one-element storage offset, expanded_q = learned queries shared by
    the batch (batch stride 0)."""
    if memory == "fused":
        q = _randn((B, Sq, Hq * D), dtype, device).unflatten(-1, (Hq, D))
        kv = _randn((B, Sk, 2 * Hk * D), dtype, device)
        k, v = (kv[..., i * Hk * D:(i + 1) * Hk * D].unflatten(-1, (Hk, D)) for i in (0, 1))
        ts = [q, k, v]
    else:
        shapes = [(B, Sq, Hq, D), (B, Sk, Hk, D), (B, Sk, Hk, D)]
        if memory == "strided_d":
            ts = [_randn((*s[:-1], 2 * D), dtype, device)[..., ::2] for s in shapes]
        elif memory == "offset":
            ts = [_randn((torch.Size(s).numel() + 1,), dtype, device)[1:].view(s) for s in shapes]
        elif memory == "expanded_q":
            ts = [_randn((1, *shapes[0][1:]), dtype, device).expand(shapes[0]),
                  _randn(shapes[1], dtype, device), _randn(shapes[2], dtype, device)]
        else:
            ts = [_randn(s, dtype, device) for s in shapes]
        if layout == "bhsd" and memory == "contiguous":  # contiguous in HF's layout
            ts = [_randn((s[0], s[2], s[1], s[3]), dtype, device).transpose(1, 2) for s in shapes]
    return tuple(t.transpose(1, 2) if layout == "bhsd" else t for t in ts)


def mllama_mask(B, S, M, T, seed=0, dead_rows=2):
    """A processor-like (B, S, M, T) int64 tile mask: row s sees the images whose token came
    before it (the first n_tiles[m] tiles of each), some rows see nothing; plus random holes."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, S, M, T, dtype=torch.int64)
    for b in range(B):
        starts = sorted(torch.randint(0, S, (M,), generator=g).tolist())
        for m in range(M):
            n_tiles = int(torch.randint(1, T + 1, (1,), generator=g))
            mask[b, starts[m]:, m, :n_tiles] = 1
        mask[b, : min(dead_rows, S)] = 0
    holes = torch.rand(B, S, M, T, generator=g) < 0.1
    return mask.masked_fill(holes, 0)


def run(mod, q, k, v, grad=None, **kw):
    """(out, (dq, dk, dv)) of mod.cross_attention; grads None without `grad`."""
    if grad is None:
        return mod.cross_attention(q, k, v, **kw), None
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = mod.cross_attention(q, k, v, **kw)
    if not out.requires_grad:  # the reference of an empty batch is a constant
        return out, tuple(torch.zeros_like(t) for t in (q, k, v))
    grads = torch.autograd.grad(out, (q, k, v), grad, allow_unused=True, materialize_grads=True)
    return out, grads


def _err(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def check(out, ref64, out_pt=None, factor=2.0, fp32_tol=2e-5):
    """fp32/fp64: max|out − ref64| ≤ fp32_tol·max(1, max|ref64|). bf16/fp16 (G3): ≤ factor ×
    PyTorch's own low-precision error (out_pt) + one ulp of max|ref64|."""
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    if out.numel() == 0:
        return
    top = ref64.detach().abs().max().item()
    err = _err(out, ref64)
    if out.dtype in (torch.float32, torch.float64):
        tol = (1e-12 if out.dtype == torch.float64 else fp32_tol) * max(1.0, top)
        assert err <= tol, f"err {err:.3g} > {tol:.3g}"
        return
    floor = torch.finfo(out.dtype).eps * max(top, 1e-3)
    bound = factor * _err(out_pt, ref64) + floor
    assert err <= bound, f"err {err:.3g} vs plain PyTorch {_err(out_pt, ref64):.3g}"


def check_all(q, k, v, grad=True, **kw):
    """Forward and (with grad) backward of vlmkern vs the float64 reference (and, for bf16/fp16,
    the same-precision plain-PyTorch chain, HF eager's precision)."""
    g = torch.randn(vlmkern.ops.cross_attention(q, k, v, **kw).shape).to(q.dtype) if grad else None
    out, grads = run(vlmkern.ops, q, k, v, g, **kw)
    ref, rgrads = run(reference, *(t.double() for t in (q, k, v)),
                      g.double() if grad else None, **kw)
    lowp = q.dtype in (torch.float16, torch.bfloat16)
    pt, pgrads = run(reference, q, k, v, g, compute_dtype=None, **kw) if lowp else (None, None)
    assert out.dtype == q.dtype
    if k.numel() and "kv_ranges" not in kw and "prefix_len" not in kw:
        assert_nontrivial(ref)  # masks may hide every key: those tests assert on zeros
    check(out, ref, pt)
    assert not out.isnan().any()
    if grad:
        for i, (a, r) in enumerate(zip(grads, rgrads, strict=True)):
            assert not a.isnan().any()
            check(a, r, pgrads[i] if lowp else None, factor=3.0)
    return out, grads
