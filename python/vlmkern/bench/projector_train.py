"""MLP projector training-step bench: forward + backward (all seven gradients: x, w1, b1, w2, b2,
norm weight / bias) of vlmkern's op vs the HF-style eager chain under autograd, torch.compile of
that chain, and a plain ``torch.mm`` roofline of the six GEMMs a training step runs (forward,
dX and dW for each Linear). Same connectors and shapes as the ``projector`` bench.

Every provider returns ``(out, *grads)`` for a fixed all-ones output gradient; the check is against
vlmkern.reference.mlp_projector differentiated in float32."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlmkern.bench import projector as fwd
from vlmkern.bench.harness import MM, Case, Config, env_var

NAME = "projector_train"
BASELINE = "torch"
EXACT = False  # different GEMM / reduction orders: tolerance gate
ROOFLINES = (MM,)


def _step(forward: Callable, inputs: tuple, spec: fwd.Spec) -> tuple:
    """One training step through `forward`: output and the gradients of every tensor input."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs[:7]]
    with torch.enable_grad():
        out = forward(*leaves, spec=spec)
        wrt = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(out, wrt, torch.ones_like(out))
    return (out.detach(), *grads)


def vlmkern_train(*inputs, spec: fwd.Spec):
    return _step(fwd.vlmkern_projector, inputs, spec)


def vlmkern_dgelu_train(*inputs, spec: fwd.Spec):
    """vlmkern with ``VLMKERN_PROJECTOR_DGELU=fused``: the backward's exact-GELU derivative in the
    epilogue of its g @ w2 GEMM (sm_90a CUTLASS); the A/B of that kernel against cuBLAS + ATen's
    gelu_backward. Connectors without an exact GELU between two Linears take the plain path."""
    with env_var("VLMKERN_PROJECTOR_DGELU", "fused"):
        return vlmkern_train(*inputs, spec=spec)


def torch_train(*inputs, spec: fwd.Spec):
    return _step(fwd.torch_chain, inputs, spec)


def mm_roofline_train(x, w1, b1, w2, b2, nw, nb, rows=None, *, spec: fwd.Spec):
    """The six GEMMs of a training step, nothing else: h = rows·w1ᵀ, y = h·w2ᵀ, dh = g·w2,
    dw2 = gᵀ·h, drows = dh·w1, dw1 = dhᵀ·rows (g: an output-shaped gradient)."""
    h = torch.mm(rows, w1.t())
    if w2 is None:
        g = h
        return h, torch.mm(g, w1), torch.mm(g.t(), rows)
    y = torch.mm(h, w2.t())
    dh = torch.mm(y, w2)
    return y, torch.mm(y.t(), h), torch.mm(dh, w1), torch.mm(dh.t(), rows)


def cases(cfg: Config) -> list[Case]:
    """The projector bench's cases, with three times the forward's GEMM flops (fwd, dX, dW)."""
    out = []
    for c in fwd.cases(cfg):
        if "gemm1" in c.shape:  # the GEMM1-epilogue rows are forward-only
            continue
        c.flops = 3 * c.flops if c.flops else c.flops
        c.bytes_moved = 2 * c.bytes_moved  # at least: read the inputs again, write the grads
        out.append(c)
    return out


def providers(cfg: Config) -> dict[str, Callable]:
    out: dict[str, Callable] = {"vlmkern": vlmkern_train, "torch": torch_train}
    if cfg.device == "cuda" and fwd._has_cutlass_gemm():
        out["vlmkern.dgelu"] = vlmkern_dgelu_train
    if cfg.compile:  # the forward bench's recompile-per-case wrapper, under autograd
        compiled = fwd._Compiled()
        out["torch.compile"] = lambda *inputs, spec: _step(compiled, inputs, spec)
    out[MM] = mm_roofline_train
    return out


def reference() -> Callable:
    import vlmkern.reference

    def forward32(x, w1, b1, w2, b2, nw, nb, *, spec: fwd.Spec):
        return vlmkern.reference.mlp_projector(x, w1, b1, w2, b2, norm_weight=nw, norm_bias=nb,
                                               **spec.options())  # fmt: skip

    def ref(*inputs, spec: fwd.Spec):
        dtype = inputs[0].dtype
        up = tuple(t.float() if t is not None else None for t in inputs[:7])
        return tuple(t.to(dtype) for t in _step(forward32, up, spec))

    return ref
