"""gated_linear bench: Mllama-11B's gated residual after o_proj (4096 → 4096) and down_proj
(14336 → 4096), decode to long prefill; vlmkern (one cuBLASLt GEMM with gate and residual in the
epilogue) vs HF's eager ``residual + gate.tanh() * linear(x)``, torch.compile of it, vlmkern's
own ATen composite, and two rooflines: ``torch.mm`` of the same GEMM and ``torch.addmm``
(the GEMM with the residual in cuBLAS's epilogue, no gate)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlmkern.bench.harness import MM, Case, Config, env_var

NAME = "gated_linear"
BASELINE = "torch"
EXACT = False
ADDMM = "torch.addmm"
ROOFLINES = (MM, ADDMM)  # timed, not compared with the reference


def hf_gated(x, w, gate, residual):
    """HF MllamaCrossAttentionDecoderLayer: ``residual + self.cross_attn_attn_gate.tanh() * o``."""
    return residual + gate.tanh() * F.linear(x, w)


def mm_roofline(x, w, gate, residual):
    return torch.mm(x.view(-1, x.shape[-1]), w.t())


def addmm_roofline(x, w, gate, residual):
    return torch.addmm(residual.view(-1, w.shape[0]), x.view(-1, x.shape[-1]), w.t())


def vlmkern_gated(x, w, gate, residual):
    import vlmkern.ops

    return vlmkern.ops.gated_linear(x, w, gate, residual)


def vlmkern_aten(x, w, gate, residual):
    """vlmkern's ATen composite (VLMKERN_GATED_LINEAR=aten): mm, then one addcmul."""
    with env_var("VLMKERN_GATED_LINEAR", "aten"):
        return vlmkern_gated(x, w, gate, residual)


def _case(label: str, batch: int, seq: int, k: int, n: int, cfg: Config) -> Case:
    dev, dt = cfg.device, cfg.dtype
    elt = torch.empty((), dtype=dt).element_size()
    m = batch * seq

    def make() -> tuple:
        x = torch.randn(batch, seq, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
        gate = torch.full((1,), 0.5, device=dev, dtype=dt)
        return x, w, gate, torch.randn(batch, seq, n, device=dev, dtype=dt)

    return Case(f"{label} ({batch},{seq},{k})->{n}", make,
                bytes_moved=(m * k + n * k + 2 * m * n) * elt, flops=2 * m * n * k)


def cases(cfg: Config) -> list[Case]:
    """Mllama-11B o_proj (32·128 → 4096) and down_proj (14336 → 4096): decode (B = 1, 8; one
    token), prefill S = 256, 1024, 4096; smaller on the CPU."""
    if cfg.device == "cpu":
        out = [_case("mllama o_proj", 1, 64, 1024, 1024, cfg)]
        return out if cfg.quick else out + [_case("mllama o_proj", 1, 1, 4096, 4096, cfg),
                                            _case("mllama o_proj", 1, 256, 4096, 4096, cfg)]
    if cfg.quick:
        return [_case("mllama o_proj", 1, 1024, 4096, 4096, cfg),
                _case("mllama down_proj", 1, 1024, 14336, 4096, cfg)]
    out = [_case("mllama o_proj decode", b, 1, 4096, 4096, cfg) for b in (1, 8)]
    out += [_case("mllama o_proj", 1, s, 4096, 4096, cfg) for s in (256, 1024, 4096)]
    out += [_case("mllama down_proj", 1, s, 14336, 4096, cfg) for s in (1024, 4096)]
    return out


class _Compiled:
    """torch.compile of HF's formula, recompiled per case (static shapes)."""

    def __init__(self) -> None:
        self._key = None
        self._fn: Callable | None = None

    def __call__(self, x, w, gate, residual):
        key = (tuple(x.shape), tuple(w.shape), x.dtype, x.device)
        if key != self._key:
            torch._dynamo.reset()
            self._fn = torch.compile(hf_gated, dynamic=False)
            self._key = key
        return self._fn(x, w, gate, residual)


def providers(cfg: Config) -> dict[str, Callable]:
    out: dict[str, Callable] = {"vlmkern": vlmkern_gated, "vlmkern.aten": vlmkern_aten,
                                "torch": hf_gated}
    if cfg.compile:
        out["torch.compile"] = _Compiled()
    out[MM] = mm_roofline
    out[ADDMM] = addmm_roofline
    return out


def reference() -> Callable:
    def ref(x, w, gate, residual):
        return hf_gated(x.double(), w.double(), gate.double(), residual.double()).to(x.dtype)

    return ref
