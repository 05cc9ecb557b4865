"""The projector bench's providers on tiny inputs: every one (the GPU-only cuBLASLt chain too, whose
tanh GELU is a different function) agrees with vlmkern.reference, and the torch.mm roofline runs
the same GEMM shapes."""

import pytest
import torch

from vlmkern.bench import load
from vlmkern.bench.harness import Config

bench = load("projector")
SPECS = {
    "llava": bench.Spec(),
    "internvl": bench.Spec(norm="layernorm", norm_position="post", shuffle=2, grid=(4, 6)),
    "qwen2_vl": bench.Spec(norm="layernorm", eps=1e-6, merge=2),
    "qwen2_5_vl": bench.Spec(norm="rmsnorm", eps=1e-6, merge=2),
    "idefics3": bench.Spec(activation="none", shuffle=2, grid=(4, 4)),
    "gelu_tanh": bench.Spec(activation="gelu_tanh"),  # the torch chain applies each activation
    "quick_gelu": bench.Spec(activation="quick_gelu"),
}


def _inputs(spec, c=8, n1=16, d=12, gemm1=False):
    f = spec.shuffle or spec.merge or 1
    k = c * f * f
    if spec.grid:
        x = torch.randn(2, 1 + spec.grid[0] * spec.grid[1], c)[:, 1:]
        m = 2 * spec.grid[0] * spec.grid[1] // (f * f)
    else:
        x = torch.randn(12 * f * f, c)
        m = 12
    single = spec.activation == "none"
    feats = c if spec.norm_position == "pre" else k
    no_w2 = single or gemm1
    return (x, torch.randn(n1, k) * k**-0.5, None if single else torch.randn(n1),
            None if no_w2 else torch.randn(d, n1) * n1**-0.5, None if no_w2 else torch.randn(d),
            torch.randn(feats) if spec.norm else None,
            torch.randn(feats) if spec.norm == "layernorm" else None,
            torch.randn(m, k))  # fmt: skip


@pytest.mark.parametrize("name", [*SPECS, "gemm1"])
def test_providers_agree_with_reference(name):
    spec = SPECS.get(name, bench.Spec())
    inputs = _inputs(spec, gemm1=name == "gemm1")
    ref = bench.reference()(*inputs, spec=spec)
    assert ref.norm() > 0
    providers = bench.providers(Config("cpu", torch.float32, quick=True, compile=False))
    providers["torch._addmm_activation"] = bench._only_erf_gelu_cases(bench.addmm_activation_chain)
    providers["vlmkern.cutlass"] = bench.vlmkern_cutlass  # on the CPU: the ATen path
    for pname, fn in providers.items():
        if pname in bench.ROOFLINES:
            out = fn(*inputs, spec=spec)
            assert out.shape[-1] == ref.shape[-1] and out.numel() == ref.numel()
            continue
        if pname == "torch._addmm_activation" and (spec.activation != "gelu" or inputs[2] is None):
            with pytest.raises(ValueError, match="no GELU epilogue"):
                fn(*inputs, spec=spec)
            continue
        out = fn(*inputs, spec=spec)
        tol = 1e-3 if pname == "torch._addmm_activation" else 1e-5  # tanh vs erf GELU
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol, msg=pname)


def test_cases_cover_the_issue_shapes_on_gpu():
    cfg = Config("cuda", torch.bfloat16)
    shapes = [c.shape for c in bench.cases(cfg)]
    assert sum(s.startswith("llava-1.5 M=") for s in shapes) == 4
    assert sum(s.startswith("llava-1.5 gemm1") for s in shapes) == 3  # GEMM1 + bias + GELU alone
    assert any("M=4096 " in s and s.startswith("qwen2-vl-7b") for s in shapes)  # N = 16k tokens
    assert all(c.flops for c in bench.cases(cfg))


train = load("projector_train")


@pytest.mark.parametrize("name", [*SPECS, "gemm1"])
def test_train_providers_agree_with_reference(name):
    """Forward + all gradients of every training-step provider vs the float32 reference."""
    spec = SPECS.get(name, bench.Spec())
    inputs = _inputs(spec, gemm1=name == "gemm1")
    ref = train.reference()(*inputs, spec=spec)
    assert len(ref) == 1 + sum(t is not None for t in inputs[:7]) and all(r.norm() > 0 for r in ref)
    for pname, fn in train.providers(Config("cpu", torch.float32, compile=False)).items():
        out = fn(*inputs, spec=spec)
        if pname in train.ROOFLINES:
            assert len(out) == (4 if inputs[3] is not None else 3)  # the last GEMM of each pair
            continue
        assert len(out) == len(ref), pname
        for o, r in zip(out, ref, strict=True):
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4, msg=pname)


def test_train_cases_triple_the_flops():
    cfg = Config("cuda", torch.bfloat16)
    fwd_flops = {c.shape: c.flops for c in bench.cases(cfg)}
    tr = train.cases(cfg)
    assert tr and all(c.flops == 3 * fwd_flops[c.shape] for c in tr)
    assert not any("gemm1" in c.shape for c in tr)
