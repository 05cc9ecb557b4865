"""MLP projector bench: vlmkern's op vs the HF-style PyTorch eager chain (InternVL's two-copy pixel
shuffle, Qwen's view merge, F.layer_norm / Qwen2RMSNorm, F.linear, erf GELU), torch.compile of it,
``torch._addmm_activation`` (cuBLASLt bias + *tanh* GELU epilogue: a different function, GPU only),
``vlmkern.cutlass`` / ``vlmkern.cutlass_wide`` / ``vlmkern.cutlass_pingpong`` (the op on its
fused CUTLASS GEMM paths: cooperative 128 x 128 / 128 x 256 tiles for both Linears, pingpong for
GEMM1 + GELU; sm_90a builds with CUTLASS only), ``vlmkern.cutlass_sm80`` (both Linears on the
CUTLASS 2.x kernel of any sm_80+ GPU),
``vlmkern.shuffle_gemm`` (Idefics3 and InternVL: GEMM1 reading through the pixel shuffle,
InternVL's LayerNorm applied to its A tiles from a statistics pass; Qwen's mergers: their norm
applied the same way; sm_90a)
and a plain ``torch.mm`` of the same GEMM shapes (the roofline row, not checked), on LLaVA-1.5,
InternVL2.5-8B, Qwen2-VL-7B and Idefics3 shapes.

Every provider is called as ``fn(x, w1, b1, w2, b2, norm_weight, norm_bias, rows, spec=...)``;
``rows`` is a contiguous ``(M, K)`` tensor used only by the ``torch.mm`` roofline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from vlmkern.bench.harness import MM, Case, Config, env_var

NAME = "projector"
BASELINE = "torch"
EXACT = False  # different GEMM / rounding orders: tolerance gate
ROOFLINES = (MM,)  # timed, not compared with the reference


@dataclass(frozen=True)
class Spec:
    """The connector of one case (hashable: the compiled provider keys on it)."""

    activation: str = "gelu"
    norm: str | None = None
    norm_position: str = "pre"
    eps: float = 1e-5
    shuffle: int | None = None
    merge: int | None = None
    grid: tuple[int, int] | None = None

    def options(self) -> dict:
        return {"activation": self.activation, "norm": self.norm, "eps": self.eps,
                "norm_position": self.norm_position, "shuffle": self.shuffle,
                "merge": self.merge, "grid": self.grid}  # fmt: skip


def _hf_pixel_shuffle(x: torch.Tensor, r: int, grid: tuple[int, int]) -> torch.Tensor:
    """InternVLModel.pixel_shuffle (two .contiguous() copies) for factor r, on (B, N, C)."""
    b, c = x.shape[0], x.shape[-1]
    h, w = grid
    x = x.reshape(b, h, w, c)  # HF's (n, w, h, c) naming; square grids here
    x = x.view(b, h, w // r, c * r).permute(0, 2, 1, 3).contiguous()
    x = x.view(b, w // r, h // r, c * r * r).permute(0, 2, 1, 3).contiguous()
    return x.reshape(b, -1, c * r * r)


def _norm(t, spec: Spec, nw, nb):
    if spec.norm == "layernorm":
        return F.layer_norm(t, t.shape[-1:], nw, nb, spec.eps)
    if spec.norm == "rmsnorm":
        tf = t.float()
        return nw * (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + spec.eps)).to(t.dtype)
    return t


_ACTIVATIONS = {  # HF's GELUActivation, PytorchGELUTanh, QuickGELUActivation, identity
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h),
    "none": lambda h: h,
}


def torch_chain(x, w1, b1, w2, b2, nw, nb, rows=None, *, spec: Spec, gemm1=None):
    """The projector as HF's modules run it (``gemm1`` replaces Linear + activation)."""
    t = _norm(x, spec, nw, nb) if spec.norm_position == "pre" else x
    if spec.shuffle:
        t = _hf_pixel_shuffle(t, spec.shuffle, spec.grid)
    elif spec.merge:
        t = t.reshape(-1, spec.merge**2 * t.shape[-1])
    if spec.norm_position == "post":
        t = _norm(t, spec, nw, nb)
    if gemm1 is not None:
        h = gemm1(t, w1, b1)
    else:
        h = F.linear(t, w1, b1)
        h = _ACTIVATIONS[spec.activation](h)
    return F.linear(h, w2, b2) if w2 is not None else h


def _addmm_gelu_tanh(t, w1, b1):
    """cuBLASLt's fused bias + tanh-GELU epilogue: a *different* function from HF's erf GELU."""
    flat = t.reshape(-1, t.shape[-1])
    return torch._addmm_activation(b1, flat, w1.t(), use_gelu=True).view(*t.shape[:-1], -1)


def addmm_activation_chain(x, w1, b1, w2, b2, nw, nb, rows=None, *, spec: Spec):
    return torch_chain(x, w1, b1, w2, b2, nw, nb, spec=spec, gemm1=_addmm_gelu_tanh)


def vlmkern_projector(x, w1, b1, w2, b2, nw, nb, rows=None, *, spec: Spec):
    import vlmkern.ops

    return vlmkern.ops.mlp_projector(x, w1, b1, w2, b2, norm_weight=nw, norm_bias=nb,
                                     **spec.options())  # fmt: skip


GEMM_ENV = "VLMKERN_PROJECTOR_GEMM"


def vlmkern_cutlass(*inputs, spec: Spec, mode: str = "cutlass"):
    """vlmkern with ``VLMKERN_PROJECTOR_GEMM=cutlass`` (both Linears on the cooperative CUTLASS
    kernel), ``cutlass_pingpong`` (GEMM1 + bias + GELU on the pingpong kernel, the rest on
    cuBLAS) or ``cutlass_wide``, sm_90a only, or ``cutlass_sm80`` (the CUTLASS 2.x kernel, any
    sm_80+ GPU): elsewhere, and on the CPU, the op falls back to its ATen path."""
    with env_var(GEMM_ENV, mode):
        return vlmkern_projector(*inputs, spec=spec)


def vlmkern_unfused_norm(*inputs, spec: Spec):
    """vlmkern with ``VLMKERN_PROJECTOR_SHUFFLE_NORM=aten`` (the shuffle copy, then ATen's
    LayerNorm): the A/B of the fused shuffle + LayerNorm kernel, on InternVL-style connectors."""
    if not (spec.shuffle and spec.norm == "layernorm" and spec.norm_position == "post"):
        raise ValueError("no shuffle + post-shuffle LayerNorm in this connector")
    with env_var("VLMKERN_PROJECTOR_SHUFFLE_NORM", "aten"):
        return vlmkern_projector(*inputs, spec=spec)


def vlmkern_shuffle_gemm(*inputs, spec: Spec):
    """vlmkern with ``VLMKERN_PROJECTOR_SHUFFLE_GEMM=fused``: GEMM1 reads its rows through the
    pixel shuffle's index map (sm_90a; no shuffled copy), on shuffled connectors without a norm
    (Idefics3 / SmolVLM) or with a post-shuffle LayerNorm (InternVL: a statistics pass, the rows
    normalized inside the GEMM, no normalized copy); on Qwen's mergers the merged rows as they
    are, their LayerNorm / RMSNorm applied inside the GEMM likewise."""
    idefics3 = spec.shuffle and not spec.norm
    internvl = spec.shuffle and spec.norm == "layernorm" and spec.norm_position == "post"
    merger = spec.merge and spec.norm
    if not (idefics3 or internvl or merger):
        raise ValueError("the op would not take the fused shuffle GEMM on this connector")
    with env_var("VLMKERN_PROJECTOR_SHUFFLE_GEMM", "fused"):
        return vlmkern_projector(*inputs, spec=spec)


def _has_cutlass_gemm() -> bool:
    from vlmkern import _C

    return bool(getattr(_C, "cutlass_gemm", 0)) and torch.cuda.get_device_capability() == (9, 0)


def mm_roofline(x, w1, b1, w2, b2, nw, nb, rows=None, *, spec: Spec):
    """The same GEMMs, nothing else: rows (M, K) @ w1ᵀ (@ w2ᵀ)."""
    h = torch.mm(rows, w1.t())
    return torch.mm(h, w2.t()) if w2 is not None else h


def _case(label: str, spec: Spec, x_shape, c: int, n1: int, d: int | None, cfg: Config,
          bias: bool = True) -> Case:  # fmt: skip
    dev, dt = cfg.device, cfg.dtype
    f = spec.shuffle or spec.merge or 1
    k = c * f * f
    tokens = 1
    for s in x_shape[:-1]:
        tokens *= s
    if spec.grid is not None:
        tokens -= x_shape[0]  # the CLS token of each image is dropped
    m = tokens // (f * f)
    features = c if spec.norm_position == "pre" else k

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=dev)).to(dt)

    def make() -> tuple:
        x = rnd(*x_shape)
        if spec.grid is not None:
            x = x[:, 1:]
        w2 = rnd(d, n1, scale=n1**-0.5) if d else None
        return (x, rnd(n1, k, scale=k**-0.5), rnd(n1) if bias else None, w2,
                rnd(d) if d and bias else None,
                1 + rnd(features, scale=0.1) if spec.norm else None,
                rnd(features, scale=0.1) if spec.norm == "layernorm" else None,
                rnd(m, k))  # fmt: skip

    elt = torch.empty((), dtype=dt).element_size()
    out_d = d or n1
    weights = n1 * k + (out_d * n1 if d else 0)
    flops = 2 * m * k * n1 + (2 * m * n1 * d if d else 0)
    shape = f"{label} M={m} {k}->{n1}" + (f"->{d}" if d else "")
    return Case(shape, make, bytes_moved=(tokens * c + weights + m * out_d) * elt,
                kwargs={"spec": spec}, flops=flops)


def cases(cfg: Config) -> list[Case]:
    """LLaVA-1.5 (576·B × 1024 → 4096 → 4096), InternVL2.5-8B (B tiles × 1025 × 1024, CLS
    dropped, r = 2 → LN(4096) → 4096 → 4096), Qwen2-VL-7B (N × 1280, LN, 2×2 merge → 5120 → 5120
    → 3584) and Idefics3 (B × 676 × 1152, r = 2 → 4608 → 4096, no bias); fewer / smaller on CPU."""
    llava = Spec()
    internvl = Spec(norm="layernorm", norm_position="post", shuffle=2, grid=(32, 32))
    qwen = Spec(norm="layernorm", eps=1e-6, merge=2)
    idefics = Spec(activation="none", shuffle=2, grid=(26, 26))

    def build(llava_b, internvl_b, qwen_n, idefics_b):
        out = [_case("llava-1.5", llava, (576 * b, 1024), 1024, 4096, 4096, cfg)
               for b in llava_b]
        out += [_case("internvl2.5-8b", internvl, (b, 1025, 1024), 1024, 4096, 4096, cfg)
                for b in internvl_b]
        out += [_case("qwen2-vl-7b", qwen, (n, 1280), 1280, 5120, 3584, cfg) for n in qwen_n]
        out += [_case("idefics3", idefics, (b, 677, 1152), 1152, 4096, None, cfg, bias=False)
                for b in idefics_b]
        return out  # fmt: skip

    def gemm1(llava_b, qwen_n):
        """GEMM1 + bias + GELU alone (the issue's "within 5 % of torch.mm" row): LLaVA's
        1024 -> 4096 and Qwen2-VL's merged 5120 -> 5120."""
        out = [_case("llava-1.5 gemm1", llava, (576 * b, 1024), 1024, 4096, None, cfg)
               for b in llava_b]
        return out + [_case("qwen2-vl-7b gemm1", llava, (n // 4, 5120), 5120, 5120, None, cfg)
                      for n in qwen_n]  # fmt: skip

    if cfg.device == "cpu":
        return build([1], [], [368], []) if cfg.quick else build([1], [1], [368, 1472], [1])
    if cfg.quick:
        return build([4], [4], [4096], [4]) + gemm1([4], [4096])
    return (build([1, 4, 16, 64], [1, 4, 13], [368, 1472, 4096, 16384], [1, 4, 13])
            + gemm1([1, 4, 16], [1472, 4096, 16384]))


class _Compiled:
    """torch.compile of the eager chain, recompiled per case (static shapes)."""

    def __init__(self) -> None:
        self._key = None
        self._fn: Callable | None = None

    def __call__(self, *inputs, spec: Spec):
        x = inputs[0]
        key = (tuple(x.shape), x.stride(), x.dtype, x.device, spec)
        if key != self._key:
            torch._dynamo.reset()
            self._fn = torch.compile(torch_chain, dynamic=False)
            self._key = key
        return self._fn(*inputs, spec=spec)


def _has_cutlass_sm80_gemm() -> bool:
    from vlmkern import _C

    compiled = bool(getattr(_C, "cutlass_sm80_gemm", 0))
    return compiled and torch.cuda.get_device_capability() >= (8, 0)


def providers(cfg: Config) -> dict[str, Callable]:
    out: dict[str, Callable] = {"vlmkern": vlmkern_projector, "torch": torch_chain}
    if cfg.compile:
        out["torch.compile"] = _Compiled()
    if cfg.device == "cuda":
        if _has_cutlass_gemm():
            out["vlmkern.cutlass"] = vlmkern_cutlass
            out["vlmkern.cutlass_pingpong"] = partial(vlmkern_cutlass, mode="cutlass_pingpong")
            out["vlmkern.cutlass_wide"] = partial(vlmkern_cutlass, mode="cutlass_wide")
        if _has_cutlass_sm80_gemm():
            out["vlmkern.cutlass_sm80"] = partial(vlmkern_cutlass, mode="cutlass_sm80")
            out["vlmkern.shuffle_gemm"] = vlmkern_shuffle_gemm
        out["torch._addmm_activation"] = _only_erf_gelu_cases(addmm_activation_chain)
        out["vlmkern.unfused_norm"] = vlmkern_unfused_norm
    out[MM] = mm_roofline
    return out


def _only_erf_gelu_cases(fn: Callable) -> Callable:
    def run(*inputs, spec: Spec):
        if spec.activation != "gelu" or inputs[2] is None:
            raise ValueError("no GELU epilogue with bias in this connector")
        return fn(*inputs, spec=spec)

    return run


def reference() -> Callable:
    import vlmkern.reference

    def ref(x, w1, b1, w2, b2, nw, nb, rows=None, *, spec: Spec):
        return vlmkern.reference.mlp_projector(x, w1, b1, w2, b2, norm_weight=nw, norm_bias=nb,
                                               **spec.options())  # fmt: skip

    return ref
