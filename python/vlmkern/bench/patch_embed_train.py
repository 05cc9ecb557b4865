"""Patch-embedding training-step bench (image mode): forward + the parameter gradients (weight,
bias, positions, CLS; the pixels need none in training) of vlmkern's op (``vlmkern``; on CUDA also
``vlmkern.implicit``: the implicit-GEMM forward and dW kernels, no patch matrix) vs the HF module
(Conv2d) and the unfold + F.linear recipe under autograd, and the ``torch.mm`` roofline of the
step's two GEMMs (forward, dW) on the pre-unfolded matrix. Same image shapes as the
``patch_embed`` bench.

Every provider returns ``(out, *grads)`` for a fixed all-ones output gradient; the check is against
vlmkern.reference.patch_embed differentiated in float32."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlmkern.bench import patch_embed as fwd
from vlmkern.bench.harness import MM, Case, Config, env_var

NAME = "patch_embed_train"
BASELINE = "unfold+linear"
EXACT = False  # different GEMM / reduction orders: tolerance gate
ROOFLINES = (MM,)


def _step(forward: Callable, pixels, weight, bias, pos, cls, pre) -> tuple:
    """One training step through `forward`: output and the gradients of weight, bias, pos, cls."""
    leaves = [t.detach().requires_grad_() if t is not None else None
              for t in (weight, bias, pos, cls)]  # fmt: skip
    with torch.enable_grad():
        out = forward(pixels, *leaves, pre)
        wrt = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(out, wrt, torch.ones_like(out))
    return (out.detach(), *grads)


def vlmkern_train(*inputs):
    return _step(fwd.vlmkern_image, *inputs)


def vlmkern_implicit_train(*inputs):
    with env_var("VLMKERN_PATCH_EMBED_GEMM", "implicit"):
        return _step(fwd.vlmkern_image, *inputs)


def hf_train(*inputs):
    return _step(fwd.hf_image, *inputs)


def unfold_train(*inputs):
    return _step(fwd.unfold_linear_image, *inputs)


def mm_roofline_train(pixels, weight, bias, pos, cls, pre):
    """The step's GEMMs on the padded pre-unfolded rows: y = X·Wᵀ and dW = Gᵀ·X (G: y)."""
    x, wt = pre[0], pre[1]
    y = torch.mm(x, wt)
    return y, torch.mm(y.t(), x)


def cases(cfg: Config) -> list[Case]:
    """The image cases of the patch_embed bench, with twice the forward's GEMM flops."""
    out = []
    for c in fwd.cases(cfg):
        if c.kwargs:  # packed (Qwen) cases: not this bench
            continue
        c.flops = 2 * c.flops if c.flops else c.flops
        c.bytes_moved = 2 * c.bytes_moved  # at least: read the pixels and the gradient again
        out.append(c)
    return out


def providers(cfg: Config) -> dict[str, Callable]:
    if cfg.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    out: dict[str, Callable] = {"vlmkern": vlmkern_train, "HF conv": hf_train,
                                "unfold+linear": unfold_train}
    if cfg.device == "cuda" and fwd.has_sm90_kernels():
        out["vlmkern.implicit"] = vlmkern_implicit_train
    out[MM] = mm_roofline_train
    return out


def reference() -> Callable:
    import vlmkern.reference

    def forward32(pixels, weight, bias, pos, cls, pre):
        return vlmkern.reference.patch_embed(fwd._crop(pixels, weight.shape[-1]), weight, bias,
                                             pos_embed=pos, cls_token=cls)

    def ref(pixels, weight, bias, pos, cls, pre):
        dtype = weight.dtype
        up = [t.float() if t is not None else None for t in (pixels, weight, bias, pos, cls)]
        return tuple(t.to(dtype) for t in _step(forward32, *up, pre))

    return ref
