"""Shared helpers of the mlp_projector tests: the connector modes of real VLMs, random inputs in
several layouts, and the two numeric tiers of TESTING.md G3 (fp32 vs fp64; low precision ≤ 2× the
error of the same chain run by PyTorch, 3× for gradients)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import vlmkern
from vlmkern import reference


@dataclass(frozen=True)
class Mode:
    """One connector recipe: which pieces exist and in which order."""

    activation: str = "gelu"
    norm: str | None = None
    norm_position: str = "pre"
    shuffle: int | None = None
    merge: int | None = None
    bias1: bool = True
    second: bool = True  # a second Linear (w2)
    bias2: bool = True
    eps: float = 1e-5


MODES = {
    "llava": Mode(),
    "clip_quick_gelu": Mode(activation="quick_gelu"),
    "siglip_gelu_tanh": Mode(activation="gelu_tanh", bias2=False),
    "internvl": Mode(norm="layernorm", norm_position="post", shuffle=2),
    "qwen2_vl": Mode(norm="layernorm", merge=2, eps=1e-6),
    "qwen2_5_vl": Mode(norm="rmsnorm", merge=2, eps=1e-6),
    "qwen3_vl_postshuffle": Mode(norm="layernorm", norm_position="post", merge=2, eps=1e-6),
    "idefics3": Mode(activation="none", shuffle=3, bias1=False, second=False, bias2=False),
    "paligemma": Mode(activation="none", second=False, bias2=False),
    "shuffle_prenorm_rms": Mode(norm="rmsnorm", shuffle=2, bias1=False),
    "no_act_two_linears": Mode(activation="none", norm="layernorm"),
    "single_linear_gelu": Mode(second=False, bias2=False, norm="rmsnorm", norm_position="post"),
}

WEIGHT_NAMES = ("w1", "b1", "w2", "b2", "norm_weight", "norm_bias")


def factor(mode: Mode) -> int:
    return mode.shuffle or mode.merge or 1


def make_x(mode: Mode, rows: int, c: int, layout: str, dtype=torch.float32, device="cpu"):
    """x with `rows` output rows, C channels per input token; returns (x, grid or None).

    shuffle: (B, H, W, C) with B*H*W/r² = rows, or (B, N, C) with a grid for the "cls" layout;
    merge: (T, C) with T = rows·s²; otherwise (B, T, C). Layouts: contiguous, "cls" (a dropped
    first token: storage offset and padded batch stride), "strided" (stride-2 channels),
    "transposed" (H and W swapped in memory; plain rows: (T, B) order)."""
    f = factor(mode)
    grid = None
    if mode.shuffle:  # B = 1, a 1 x rows grid of r x r blocks
        h, w = f, f * rows
        x = {
            "contiguous": lambda: torch.randn(1, h, w, c),
            "strided": lambda: torch.randn(1, h, w, 2 * c)[..., ::2],
            "transposed": lambda: torch.randn(1, w, h, c).transpose(1, 2),
            "cls": lambda: torch.randn(1, 1 + h * w, c)[:, 1:],
        }[layout]()
        grid = (h, w) if layout == "cls" else None
    elif mode.merge:
        t = rows * f * f
        x = {
            "contiguous": lambda: torch.randn(t, c),
            "strided": lambda: torch.randn(t, 2 * c)[:, ::2],
            "transposed": lambda: torch.randn(c, t).t(),
            "cls": lambda: torch.randn(1 + t, c)[1:],
        }[layout]()
    else:
        x = {
            "contiguous": lambda: torch.randn(1, rows, c),
            "strided": lambda: torch.randn(1, rows, 2 * c)[..., ::2],
            "transposed": lambda: torch.randn(c, rows).t().unsqueeze(0),
            "cls": lambda: torch.randn(1, 1 + rows, c)[:, 1:],
        }[layout]()
    return x.to(device=device, dtype=dtype), grid


def make_weights(mode: Mode, c: int, n1: int, d: int, dtype=torch.float32, device="cpu"):
    """Weights scaled so that every stage sees values of order 1."""
    k = c * factor(mode) ** 2
    g = {}
    g["w1"] = torch.randn(n1, k) * k**-0.5
    g["b1"] = 0.5 * torch.randn(n1) if mode.bias1 else None
    g["w2"] = torch.randn(d, n1) * n1**-0.5 if mode.second else None
    g["b2"] = 0.5 * torch.randn(d) if mode.second and mode.bias2 else None
    features = c if (mode.norm_position == "pre" and factor(mode) > 1) else k
    g["norm_weight"] = 1 + 0.2 * torch.randn(features) if mode.norm else None
    g["norm_bias"] = 0.2 * torch.randn(features) if mode.norm == "layernorm" else None
    return {n: (t.to(device=device, dtype=dtype) if t is not None else None) for n, t in g.items()}


def options(mode: Mode, grid=None) -> dict:
    return {
        "activation": mode.activation, "norm": mode.norm, "eps": mode.eps,
        "norm_position": mode.norm_position, "shuffle": mode.shuffle, "merge": mode.merge,
        "grid": grid,
    }  # fmt: skip


def run(fn, x, weights, opts, **overrides):
    return fn(x, weights["w1"], weights["b1"], weights["w2"], weights["b2"],
              norm_weight=weights["norm_weight"], norm_bias=weights["norm_bias"],
              **{**opts, **overrides})  # fmt: skip


def cast(x, weights, dtype):
    return x.to(dtype), {n: (t.to(dtype) if t is not None else None) for n, t in weights.items()}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    # compared on the CPU: the float64 reference may live there while out is on CUDA
    return (a.double().cpu() - b.double().cpu()).abs().max().item() if a.numel() else 0.0


def fp32_rel_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """max |out - ref64| / max |ref64|: the fp32 tier asks for <= 1e-5."""
    scale = ref64.abs().max().item() if ref64.numel() else 1.0
    return max_err(out, ref64) / max(scale, 1e-30)


def assert_lowprec_tier(out, pt, ref64, factor_=2.0, what="output"):
    """G3(b): max|out - ref64| <= factor * max|pt - ref64| + floor."""
    floor = 1e-6 * (1 + (ref64.abs().max().item() if ref64.numel() else 0))
    ours, theirs = max_err(out, ref64), max_err(pt, ref64)
    assert ours <= factor_ * theirs + floor, f"{what}: error {ours:.3g} vs PyTorch's {theirs:.3g}"


def grads_of(fn, x, weights, opts, grad_out_seed=1):
    """(out, {name: grad}) of fn on leaf copies of x and every weight."""
    leaves = {"x": x.detach().clone().requires_grad_()}
    leaves.update({n: t.detach().clone().requires_grad_() for n, t in weights.items()
                   if t is not None})  # fmt: skip
    w = {n: leaves.get(n) for n in WEIGHT_NAMES}
    out = run(fn, leaves["x"], w, opts)
    gen = torch.Generator().manual_seed(grad_out_seed)
    g = torch.randn(out.shape, generator=gen).to(out.dtype).to(out.device)
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], g)
    return out.detach(), dict(zip(names, grads, strict=True))


OURS = vlmkern.ops.mlp_projector
REF = reference.mlp_projector


def cutlass_kernels(fn) -> tuple[object, int]:
    """fn()'s result and how many CUTLASS GEMM kernels it launched: 3.x GemmUniversal, or the
    sm_80+ 2.x GemmWithFusedEpilogue (cuBLAS has none)."""
    from torch.profiler import ProfilerActivity, profile

    # CPU activity too: with CUDA alone Kineto has been seen to drop kernel events.
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    names = ("GemmUniversal", "GemmWithFusedEpilogue")
    return out, sum(e.device_type == cuda and any(n in e.name for n in names)
                    for e in prof.events())
