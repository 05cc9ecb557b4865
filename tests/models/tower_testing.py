"""Checks the vlmkern.models tower tests share: ``outputs(model, pixels)`` gives a dict of
tensors (HF's and ours under the same keys), compared in bf16 and in their gradients."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from projector_testing import assert_lowprec_tier, fp32_rel_err


def loss_of(out: dict, seed: int = 1) -> torch.Tensor:
    """A fixed random weighting of every output, summed."""
    gen = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=gen)).sum() for t in out.values())


def assert_bf16_within_twice_hfs_error(hf: torch.nn.Module, from_hf: Callable,
                                       hf_outputs: Callable, ours_outputs: Callable,
                                       x: torch.Tensor) -> None:
    """Ours built from HF's bf16 copy: each output's error vs HF in fp64 is <= 2x HF's bf16
    error (G3), and bf16 really ran."""
    with torch.no_grad():
        ref = hf_outputs(copy.deepcopy(hf).double(), x.double())
        hf16 = copy.deepcopy(hf).to(torch.bfloat16)
        pt = hf_outputs(hf16, x)
        got = ours_outputs(from_hf(hf16), x)
    for key, r in ref.items():
        assert r.abs().max() > 0 and got[key].dtype == torch.bfloat16
        assert fp32_rel_err(got[key], r) > 1e-4  # bf16 really ran
        assert_lowprec_tier(got[key], pt[key], r, what=str(key))


def assert_gradients_match(hf: torch.nn.Module, ours: torch.nn.Module, hf_outputs: Callable,
                           ours_outputs: Callable, x: torch.Tensor) -> None:
    """The pixels' and every parameter's gradients of loss_of(outputs) equal HF's (fp32, 1e-4
    of the largest; a gradient that is 0 in exact math, k_proj's bias under softmax, is
    rounding noise in both: measured against a hundredth of the largest gradient)."""
    grads = []
    for model, outputs in ((hf, hf_outputs), (ours, ours_outputs)):
        xi = x.clone().requires_grad_()
        loss_of(outputs(model, xi)).backward()
        grads.append({"pixels": xi.grad, **{n: p.grad for n, p in model.named_parameters()}})
    want, got = grads
    assert got.keys() == want.keys()
    assert all(g is not None for g in want.values())  # every parameter is reached
    floor = 1e-2 * max(g.abs().max().item() for g in want.values())
    for key, g in want.items():
        err = (got[key].double() - g.double()).abs().max().item()
        assert err <= 1e-4 * max(g.abs().max().item(), floor), key
    assert want["pixels"].abs().max() > 0


def assert_compiled_equals_eager(run: Callable, x: torch.Tensor) -> None:
    """``run(pixels) -> dict`` compiled (fullgraph, aot_eager: the ops' fake kernels and
    autograd traced) equals eager, forward and the pixels' gradient."""
    results = []
    for fn in (run, torch.compile(run, fullgraph=True, backend="aot_eager")):
        xi = x.clone().requires_grad_()
        out = fn(xi)
        loss_of(out).backward()
        results.append((out, xi.grad))
    (want, want_grad), (got, got_grad) = results
    for key, ref in want.items():
        assert ref.abs().max() > 0
        torch.testing.assert_close(got[key], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4,
                               atol=1e-5 * want_grad.abs().max().item())
