"""torch.autocast rules of the compute ops (ops/_autocast.py): inside a region, fp32 inputs are
cast to the region's dtype (bf16 or fp16) and the op runs on them with autocast off: the result
equals the op on pre-cast inputs, bit for bit; mixed-dtype inputs (as autocast's Linears leave
them) are accepted; float64 is left alone; fp32 leaves get fp32 gradients; torch.compile traces
it without graph breaks."""

import pytest
import torch

import vlmkern

LOWP = [torch.bfloat16, torch.float16]


def _cases(device):
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g).to(device)

    pixels = r(2, 3, 16, 16)
    return {
        "cross_attention": (lambda q, k, v: vlmkern.ops.cross_attention(q, k, v),
                            [r(1, 4, 7, 64), r(1, 2, 9, 64), r(1, 2, 9, 64)]),
        "mlp_projector": (lambda x, w1, b1, w2, b2: vlmkern.ops.mlp_projector(x, w1, b1, w2, b2),
                          [r(2, 5, 16), r(24, 16), r(24), r(8, 24), r(8)]),
        "gated_linear": (lambda x, w, gate, res: vlmkern.ops.gated_linear(x, w, gate, res),
                         [r(2, 5, 16), r(12, 16), r(1), r(2, 5, 12)]),
        "patch_embed": (lambda px, w, pos: vlmkern.ops.patch_embed(px, w, pos_embed=pos,
                                                                   pos_interp="none"),
                        [pixels, r(8, 3, 4, 4), r(16, 8)]),
        "patch_embed_varlen": (lambda a, b, w: vlmkern.ops.patch_embed([a, b], w)[0],
                               [pixels[0], pixels[1, :, :8], r(8, 3, 4, 4)]),
    }


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("name", list(_cases("cpu")))
def test_region_casts_inputs_then_runs_unautocast(name, dtype, device):
    fn, args = _cases(device)[name]
    with torch.autocast(device, dtype=dtype):
        out = fn(*args)
    expected = fn(*[a.to(dtype) for a in args])
    assert out.dtype == dtype
    assert torch.equal(out, expected)


def test_mixed_dtypes_and_float64(device):
    """q / k / v of different float dtypes (autocast's Linears feeding an fp32 RMSNorm) run in the
    region's dtype; float64 inputs are not autocast's to touch."""
    q = torch.randn(1, 4, 7, 64, device=device)
    k = torch.randn(1, 2, 9, 64, device=device).bfloat16()
    v = torch.randn(1, 2, 9, 64, device=device).half()
    with torch.autocast(device, dtype=torch.bfloat16):
        assert vlmkern.ops.cross_attention(q, k, v).dtype == torch.bfloat16
        q64, k64, v64 = (t.double() for t in (q, k, v))
        if device == "cpu":  # the CUDA kernels take fp16 / bf16 only
            assert vlmkern.ops.cross_attention(q64, k64, v64).dtype == torch.float64


def test_fp32_leaves_get_fp32_gradients(device):
    x = torch.randn(2, 5, 16, device=device, requires_grad=True)
    w1 = torch.randn(24, 16, device=device, requires_grad=True)
    w2 = torch.randn(8, 24, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = vlmkern.ops.mlp_projector(x, w1, None, w2, None)
    out.float().square().sum().backward()
    assert all(t.grad.dtype == torch.float32 and t.grad.abs().sum() > 0 for t in (x, w1, w2))


def test_compile_under_autocast(device):
    backend = "inductor" if device == "cuda" else "aot_eager"
    fn, args = _cases(device)["gated_linear"]
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    with torch.autocast(device, dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(*args), fn(*args))
