"""Patch embedding (stride = kernel conv as one GEMM + bias + positions + CLS, uint8 pixels with
the normalization folded in): public wrapper, fake kernels and autograd for torch.ops.vlmkern."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _patch_embed_checks as chk
from ._autocast import register_autocast

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def patch_embed(
    pixels: torch.Tensor | Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    patch_size: int | None = None,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    rescale: float = 1.0,
    channels_last: bool = False,
    crop: bool = False,
    pos_interp: str | None = None,
    temporal_patch_size: int | None = None,
    grid_thw: torch.Tensor | None = None,
    spatial_merge_size: int = 1,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Patchify + project + bias + positions (+ CLS) in one op, forward and backward.

    **Image mode** (``grid_thw`` is None; CLIP, SigLIP, InternViT, BLIP-2/EVA, Mllama's conv):
    ``pixels`` ``(B, C, H, W)`` or, with ``channels_last=True``, ``(B, H, W, C)``; any strides;
    float (cast to ``weight.dtype`` first, as HF does) or ``uint8``. ``weight`` ``(D, C, P, P)``
    (a Conv2d weight), ``H`` and ``W`` divisible by ``P``. Returns ``(B, [1 +] (H/P)·(W/P), D)``
    in ``weight.dtype``: ``Out[b, 1 + i] = conv(x)[b, :, i] + bias + pos[i]`` and, with
    ``cls_token`` ``(D,)``, ``Out[b, 0] = cls_token + pos_embed[0]`` (HF's cat-then-add).
    ``pos_embed`` ``(L, D)`` or ``(1, L, D)`` holds ``[1 +] S·S`` rows (the CLS position first
    when ``cls_token`` is given); it is bicubic-resized (``align_corners=False``, exactly HF's
    ``interpolate_pos_encoding``) to the ``(H/P, W/P)`` grid when that differs from ``(S, S)``.
    ``pos_interp``: ``"bicubic"`` (default) or ``"none"`` (the table must already have
    ``(H/P)·(W/P)`` rows). ``H`` or ``W`` not divisible by ``P`` is an error unless
    ``crop=True``, which drops the trailing ``H mod P`` rows / ``W mod P`` columns as a
    ``padding="valid"`` Conv2d does (SigLIP-so400m/14 at 384², 27×27 patches); it is a view.

    **Variable-resolution images** (``pixels`` a list of ``(C, H, W)`` / ``(H, W, C)`` images of
    different sizes, image mode otherwise): returns ``(tokens (Σ T_i, D), cu_seqlens (n + 1,)
    int32)``, each image's ``[CLS +]`` tokens packed in order with positions resized to its own
    grid; one op call, the per-image loop runs in C++ and cu_seqlens is filled on the device.

    **Packed mode** (``grid_thw`` given; Qwen2-VL / 2.5-VL / 3-VL): ``pixels`` are the processor's
    pre-patchified rows ``(N, C·T·P·P)`` in ``(C, T, ph, pw)`` order, ``weight`` the Conv3d weight
    ``(D, C, T, P, P)``, ``grid_thw`` ``(n, 3)`` int32/int64 on the same device. ``pos_embed``
    ``(S·S, D)`` (Qwen3-VL) is resampled bilinearly (``align_corners=True``) to each entry's
    ``(h, w)`` grid in spatial-merge-block order (``spatial_merge_size``), as HF's
    ``Qwen3VLVisionModel`` does. Returns ``(tokens (N, D), cu_seqlens (n + 1,) int32)``, the
    token offsets of each ``grid_thw`` entry (all its frames), computed on the device without a
    host sync. On the CPU, grid_thw's values are validated (positive, sum of t·h·w == N); CUDA
    never reads them back. Qwen's ViT attention runs per *frame*: for video entries (t > 1) its
    segments are ``F.pad(torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    .cumsum(0, dtype=torch.int32), (1, 0))`` (Σt + 1 offsets, a data-dependent size, so not an
    output of this op); for images (t = 1) the two are the same.

    **Normalization** (both modes): ``x = (p · rescale − mean[c]) / std[c]`` per channel, e.g.
    ``uint8`` pixels with ``rescale=1/255`` and the processor's mean/std, is folded into the
    GEMM weights: ``W' = W·rescale/std`` (in the weight dtype's opmath, fp32 for fp16 / bf16),
    ``b' = b − Σ W·mean/std`` (the sum accumulated in fp32, the correction in float64).

    Differentiable in ``weight``, ``bias``, ``pos_embed`` (through the resize), ``cls_token`` and
    float ``pixels``. ``patch_size`` / ``temporal_patch_size``, when given, must match ``weight``.

    CUDA: image mode (also each image of a list) builds the patch matrix with one kernel and
    runs one cuBLASLt GEMM with bias + positions in its epilogue; with
    ``VLMKERN_PATCH_EMBED_GEMM=implicit`` (off by default, not yet run on a GPU) an sm_90a
    implicit-GEMM kernel reads the pixels itself (no patch matrix), and dW likewise. Packed
    Qwen3-VL rows: the position-rows kernel writes the bilinear positions + bias read by one
    cuBLASLt GEMM's epilogue; with ``VLMKERN_PATCH_EMBED_GEMM=implicit`` one sm_90a GEMM computes
    them in its epilogue from each token's four taps (same function, nothing else written).
    """
    if isinstance(pixels, (list, tuple)):
        return _varlen(list(pixels), weight, bias, patch_size, pos_embed, cls_token, mean, std,
                       rescale, channels_last, crop, pos_interp, grid_thw)
    if grid_thw is None:
        _expect(patch_size, weight.shape[-1] if weight.dim() == 4 else None, "patch_size")
        if crop and pixels.dim() == 4 and weight.dim() == 4 and weight.shape[-1] > 0:
            p = weight.shape[-1]
            h_dim, w_dim = (1, 2) if channels_last else (2, 3)
            pixels = pixels.narrow(h_dim, 0, pixels.shape[h_dim] // p * p)
            pixels = pixels.narrow(w_dim, 0, pixels.shape[w_dim] // p * p)
        if pixels.dtype != weight.dtype and pixels.dtype in _FLOATS:
            pixels = pixels.to(weight.dtype)
        if pos_embed is not None and pos_embed.dim() == 3 and pos_embed.shape[0] == 1:
            pos_embed = pos_embed[0]
        if cls_token is not None and cls_token.dim() > 1:
            cls_token = cls_token.reshape(-1)
        interp = "bicubic" if pos_interp is None else pos_interp
        return torch.ops.vlmkern.patch_embed(
            pixels, weight, bias, pos_embed, cls_token, _floats(mean), _floats(std),
            float(rescale), channels_last, interp,
        )
    if pos_interp not in (None, "bilinear"):
        raise ValueError(
            f"vlmkern.patch_embed: with grid_thw the positions are resampled bilinearly "
            f"(align_corners=True); pos_interp must be None or 'bilinear', got {pos_interp!r}"
        )
    if cls_token is not None or channels_last:
        raise ValueError("vlmkern.patch_embed: cls_token and channels_last are image-mode only "
                         "(grid_thw not given)")
    if weight.dim() == 5:
        _expect(patch_size, weight.shape[-1], "patch_size")
        _expect(temporal_patch_size, weight.shape[2], "temporal_patch_size")
    if pixels.dtype != weight.dtype and pixels.dtype in _FLOATS:
        pixels = pixels.to(weight.dtype)
    return torch.ops.vlmkern.patch_embed_packed(
        pixels, weight, bias, grid_thw, pos_embed, spatial_merge_size, _floats(mean),
        _floats(std), float(rescale),
    )


def _varlen(images, weight, bias, patch_size, pos_embed, cls_token, mean, std, rescale,
            channels_last, crop, pos_interp, grid_thw):
    """A list of (C, H, W) (or (H, W, C)) images of different sizes -> packed tokens."""
    if grid_thw is not None:
        raise ValueError("vlmkern.patch_embed: a list of images takes no grid_thw")
    _expect(patch_size, weight.shape[-1] if weight.dim() == 4 else None, "patch_size")
    p = weight.shape[-1] if weight.dim() == 4 else 0
    h_dim, w_dim = (0, 1) if channels_last else (1, 2)
    if crop and p > 0:  # views only
        images = [im.narrow(h_dim, 0, im.shape[h_dim] // p * p).narrow(
            w_dim, 0, im.shape[w_dim] // p * p) if im.dim() == 3 else im for im in images]
    images = [im.to(weight.dtype) if im.dtype != weight.dtype and im.dtype in _FLOATS else im
              for im in images]
    if pos_embed is not None and pos_embed.dim() == 3 and pos_embed.shape[0] == 1:
        pos_embed = pos_embed[0]
    if cls_token is not None and cls_token.dim() > 1:
        cls_token = cls_token.reshape(-1)
    return torch.ops.vlmkern.patch_embed_varlen(
        images, weight, bias, pos_embed, cls_token, _floats(mean), _floats(std), float(rescale),
        channels_last, "bicubic" if pos_interp is None else pos_interp,
    )


def _expect(given: int | None, actual: int | None, name: str) -> None:
    if given is not None and actual is not None and given != actual:
        raise ValueError(f"vlmkern.patch_embed: {name}={given} but weight has {actual}")


def _floats(v: Sequence[float] | None) -> list[float] | None:
    return None if v is None else [float(x) for x in v]


# ---- fake (meta) kernels --------------------------------------------------------------------


@torch.library.register_fake("vlmkern::patch_embed")
def _patch_embed_fake(pixels, weight, bias=None, pos_embed=None, cls_token=None, mean=None,
                      std=None, rescale=1.0, channels_last=False, pos_interp="bicubic"):
    gh, gw = chk.check_image(pixels, weight, bias, pos_embed, cls_token is not None, mean,
                                   std, rescale, channels_last, pos_interp)
    chk.check_param(cls_token, "cls_token", 1, "(D,)", weight)
    first = 1 if cls_token is not None else 0
    return weight.new_empty((pixels.shape[0], first + gh * gw, weight.shape[0]))


@torch.library.register_fake("vlmkern::patch_embed_backward")
def _patch_embed_backward_fake(grad, pixels, weight, has_bias, pos_embed, has_cls, mean, std,
                               rescale, channels_last, pos_interp, output_mask):
    gh, gw = chk.check_image(pixels, weight, None, pos_embed, has_cls, mean, std,
                                           rescale, channels_last, pos_interp)
    first = 1 if has_cls else 0
    chk.check_grad(grad, (pixels.shape[0], first + gh * gw, weight.shape[0]), weight,
                   "(B, T, D)")
    chk._fail(not output_mask[0] or pixels.dtype != torch.uint8,
              "pixels is uint8: it has no gradient")
    d = weight.shape[0]
    return (
        pixels.new_empty(pixels.shape if output_mask[0] else (0,)),
        weight.new_empty(weight.shape if output_mask[1] else (0,)),
        weight.new_empty((d,) if output_mask[2] and has_bias else (0,)),
        weight.new_empty(pos_embed.shape if output_mask[3] and pos_embed is not None else (0,)),
        weight.new_empty((d,) if output_mask[4] and has_cls else (0,)),
    )


@torch.library.register_fake("vlmkern::patch_embed_packed")
def _patch_embed_packed_fake(patches, weight, bias, grid_thw, pos_embed=None,
                             spatial_merge_size=1, mean=None, std=None, rescale=1.0):
    chk.check_packed(patches, weight, bias, grid_thw, pos_embed, spatial_merge_size, mean, std,
                     rescale)
    tokens = weight.new_empty((patches.shape[0], weight.shape[0]))
    return tokens, grid_thw.new_empty((grid_thw.shape[0] + 1,), dtype=torch.int32)


@torch.library.register_fake("vlmkern::patch_embed_packed_backward")
def _patch_embed_packed_backward_fake(grad, patches, weight, has_bias, grid_thw, pos_embed,
                                      spatial_merge_size, mean, std, rescale, output_mask):
    chk.check_packed(patches, weight, None, grid_thw, pos_embed, spatial_merge_size, mean, std,
                     rescale)
    chk.check_grad(grad, (patches.shape[0], weight.shape[0]), weight, "(N, D)")
    chk._fail(not output_mask[0] or patches.dtype != torch.uint8,
              "patches is uint8: it has no gradient")
    return (
        patches.new_empty(patches.shape if output_mask[0] else (0,)),
        weight.new_empty(weight.shape if output_mask[1] else (0,)),
        weight.new_empty((weight.shape[0],) if output_mask[2] and has_bias else (0,)),
        weight.new_empty(pos_embed.shape if output_mask[3] and pos_embed is not None else (0,)),
    )


def _varlen_tokens(pixels, weight, bias, pos_embed, cls_token, mean, std, rescale,
                   channels_last, pos_interp) -> list[int]:
    tokens = []
    layout = "(H, W, C)" if channels_last else "(C, H, W)"
    for i, img in enumerate(pixels):
        chk.check_rank(img, 3, chk.OP, f"pixels[{i}]", layout)
        chk._fail(img.dtype == pixels[0].dtype,
                  f"pixels[{i}] dtype {img.dtype} differs from pixels[0]'s {pixels[0].dtype}")
        gh, gw = chk.check_image(img.unsqueeze(0), weight, bias, pos_embed,
                                       cls_token is not None, mean, std, rescale, channels_last,
                                       pos_interp)
        chk.check_param(cls_token, "cls_token", 1, "(D,)", weight)
        tokens.append((cls_token is not None) + gh * gw)
    return tokens


@torch.library.register_fake("vlmkern::patch_embed_varlen")
def _patch_embed_varlen_fake(pixels, weight, bias=None, pos_embed=None, cls_token=None,
                             mean=None, std=None, rescale=1.0, channels_last=False,
                             pos_interp="bicubic"):
    tokens = _varlen_tokens(pixels, weight, bias, pos_embed, cls_token, mean, std, rescale,
                            channels_last, pos_interp)
    return (weight.new_empty((sum(tokens), weight.shape[0])),
            weight.new_empty((len(pixels) + 1,), dtype=torch.int32))


@torch.library.register_fake("vlmkern::patch_embed_varlen_backward")
def _patch_embed_varlen_backward_fake(grad, pixels, weight, has_bias, pos_embed, has_cls, mean,
                                      std, rescale, channels_last, pos_interp, output_mask):
    cls = weight.new_empty((weight.shape[0],)) if has_cls else None
    total = sum(_varlen_tokens(pixels, weight, None, pos_embed, cls, mean, std, rescale,
                               channels_last, pos_interp))
    chk.check_grad(grad, (total, weight.shape[0]), weight, "(T, D)")
    d = weight.shape[0]
    images = [im.new_empty(im.shape, dtype=weight.dtype) for im in pixels] if output_mask[0] \
        else []
    return (
        images,
        weight.new_empty(weight.shape if output_mask[1] else (0,)),
        weight.new_empty((d,) if output_mask[2] and has_bias else (0,)),
        weight.new_empty(pos_embed.shape if output_mask[3] and pos_embed is not None else (0,)),
        weight.new_empty((d,) if output_mask[4] and has_cls else (0,)),
    )


# ---- autograd: the backward ops recompute the patch matrix; the forward saves only inputs ------


def _requires_grad(tensors) -> list[bool]:
    """Which inputs get a gradient (ctx.needs_input_grad is flattened with Nones and float lists
    removed, so it cannot be indexed by argument position)."""
    return [t is not None and t.requires_grad for t in tensors]


def _setup_image(ctx, inputs, output) -> None:
    pixels, weight, bias, pos_embed, cls_token, mean, std, rescale, channels_last, interp = inputs
    ctx.save_for_backward(pixels, weight, pos_embed)
    ctx.has_bias, ctx.has_cls = bias is not None, cls_token is not None
    ctx.args = (mean, std, rescale, channels_last, interp)
    ctx.mask = _requires_grad(inputs[:5])


def _image_backward(ctx, grad):
    pixels, weight, pos_embed = ctx.saved_tensors
    mean, std, rescale, channels_last, interp = ctx.args
    mask = ctx.mask
    grads = torch.ops.vlmkern.patch_embed_backward(
        grad, pixels, weight, ctx.has_bias, pos_embed, ctx.has_cls, mean, std, rescale,
        channels_last, interp, mask,
    )
    return (*(g if m else None for g, m in zip(grads, mask, strict=True)),) + (None,) * 5


def _setup_packed(ctx, inputs, output) -> None:
    patches, weight, bias, grid_thw, pos_embed, merge, mean, std, rescale = inputs
    ctx.save_for_backward(patches, weight, grid_thw, pos_embed)
    ctx.has_bias = bias is not None
    ctx.args = (merge, mean, std, rescale)
    ctx.mask = _requires_grad((patches, weight, bias, pos_embed))


def _packed_backward(ctx, grad, _grad_cu_seqlens):
    patches, weight, grid_thw, pos_embed = ctx.saved_tensors
    merge, mean, std, rescale = ctx.args
    mask = ctx.mask
    d_patches, d_weight, d_bias, d_pos = torch.ops.vlmkern.patch_embed_packed_backward(
        grad, patches, weight, ctx.has_bias, grid_thw, pos_embed, merge, mean, std, rescale,
        mask,
    )
    return (d_patches if mask[0] else None, d_weight if mask[1] else None,
            d_bias if mask[2] else None, None, d_pos if mask[3] else None, None, None, None, None)


def _setup_varlen(ctx, inputs, output) -> None:
    images, weight, bias, pos_embed, cls_token, mean, std, rescale, channels_last, interp = inputs
    ctx.save_for_backward(weight, pos_embed, *images)
    ctx.has_bias, ctx.has_cls = bias is not None, cls_token is not None
    ctx.args = (mean, std, rescale, channels_last, interp)
    ctx.mask = [any(im.requires_grad for im in images),
                *_requires_grad((weight, bias, pos_embed, cls_token))]


def _varlen_backward(ctx, grad, _grad_cu_seqlens):
    weight, pos_embed, *images = ctx.saved_tensors
    mean, std, rescale, channels_last, interp = ctx.args
    mask = ctx.mask
    d_images, *grads = torch.ops.vlmkern.patch_embed_varlen_backward(
        grad, images, weight, ctx.has_bias, pos_embed, ctx.has_cls, mean, std, rescale,
        channels_last, interp, mask,
    )
    out = (list(d_images) if mask[0] else [None] * len(images),
           *(g if m else None for g, m in zip(grads, mask[1:], strict=True))) + (None,) * 5
    # A Tensor[] op's backward must match the structure torch recorded for the call: torch 2.11
    # leaves trailing default arguments out of it (6 entries here), later torch keeps all 10.
    # ctx.needs_input_grad has that structure; the dropped tail is always None.
    n = len(ctx.needs_input_grad)
    assert all(g is None for g in out[n:]), "vlmkern.patch_embed: a gradient would be dropped"
    return out[:n] + (None,) * (n - len(out))


torch.library.register_autograd(
    "vlmkern::patch_embed", _image_backward, setup_context=_setup_image
)
torch.library.register_autograd(
    "vlmkern::patch_embed_varlen", _varlen_backward, setup_context=_setup_varlen
)
torch.library.register_autograd(
    "vlmkern::patch_embed_packed", _packed_backward, setup_context=_setup_packed
)
register_autocast("patch_embed")
register_autocast("patch_embed_packed")
register_autocast("patch_embed_varlen")
