"""Input builders and the two-tier numerics check (G3) shared by the patch_embed tests."""

import torch

from vlmkern import reference

# (B, C, H, W, P, D): size-0 and size-1 dims, odd and non-square grids, C != 3, D off tile edges,
# and the real CLIP-L/14-336, SigLIP-so400m/14-384 (cropped to 378), InternViT-448 and Mllama-560
# (one tile) shapes.
IMAGE_SHAPES = {
    "clip-tiny": (2, 3, 28, 28, 7, 32),
    "one-patch": (1, 3, 14, 14, 14, 16),
    "empty-batch": (0, 3, 28, 28, 7, 8),
    "zero-height": (2, 3, 0, 28, 7, 8),
    "odd-nonsquare": (3, 3, 35, 21, 7, 24),
    "c1": (2, 1, 12, 12, 4, 8),
    "c4": (2, 4, 16, 8, 4, 12),
    "d113": (1, 3, 30, 30, 5, 113),
    "p2-d1023": (1, 3, 16, 16, 2, 1023),
    "odd-p3": (2, 3, 9, 15, 3, 7),
    "clip-l14-336": (1, 3, 336, 336, 14, 1024),
    "siglip-so400m": (1, 3, 378, 378, 14, 1152),
    "internvit-448": (1, 3, 448, 448, 14, 1024),
    "mllama-560": (1, 3, 560, 560, 14, 1280),
}
# model flavour: (bias, cls, positions)
FLAVOURS = {
    "clip": (False, True, True),
    "siglip": (True, False, True),
    "internvit": (True, True, True),
    "plain": (True, False, False),
    "mllama": (False, False, False),
    "cls-only": (False, True, False),
}
LAYOUTS = ["contiguous", "sliced", "channels_last", "nchw_strided_cl", "expanded"]


def make_pixels(shape, dtype, layout, uint8=False):
    """(pixels, channels_last) for an image batch (B, C, H, W) in the given memory layout."""
    B, C, H, W = shape

    def rand(*s):
        if uint8:
            return torch.randint(0, 256, s, dtype=torch.uint8)
        return torch.randn(s).to(dtype)

    if layout == "contiguous":
        return rand(B, C, H, W), False
    if layout == "sliced":  # stride-2 columns
        return rand(B, C, H, 2 * W)[..., ::2], False
    if layout == "channels_last":  # (B, H, W, C) tensor
        return rand(B, H, W, C), True
    if layout == "nchw_strided_cl":  # NCHW shape, channels-last memory
        return rand(B, H, W, C).permute(0, 3, 1, 2), False
    if layout == "expanded":  # batch stride 0
        return rand(1, C, H, W).expand(B, C, H, W), False
    raise AssertionError(layout)


def make_params(C, P, D, flavour, dtype, grid, table_side=None, scale=0.3):
    """weight, bias, pos_embed (table (S*S [+1], D), S = table_side or the grid), cls_token."""
    has_bias, has_cls, has_pos = FLAVOURS[flavour]
    weight = (torch.randn(D, C, P, P) * scale).to(dtype)
    bias = torch.randn(D).to(dtype) if has_bias else None
    cls = torch.randn(D).to(dtype) if has_cls else None
    pos = None
    if has_pos:
        side = table_side or grid
        rows = (side * side if isinstance(side, int) else side[0] * side[1]) + (1 if has_cls else 0)
        pos = torch.randn(rows, D).to(dtype)
    return weight, bias, pos, cls


def to64(t):
    return None if t is None else (t.double() if t.is_floating_point() else t)


def assert_close_two_tier(out, args, kwargs, what="", ref_fn=None):
    """G3: fp32 within 1e-5 of max|ref64| (K-scaled floor for long dot products); bf16/fp16 at most
    twice the error of the plain-PyTorch reference run in the same precision, plus a floor."""
    ref_fn = ref_fn or reference.patch_embed
    args64 = [to64(a) if isinstance(a, torch.Tensor) else a for a in args]
    kw64 = {k: to64(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    ref64 = ref_fn(*args64, **kw64)
    out_t = out[0] if isinstance(out, tuple) else out
    ref_t = ref64[0] if isinstance(ref64, tuple) else ref64
    assert out_t.shape == ref_t.shape, what
    if ref_t.numel() == 0:
        return
    scale = ref_t.abs().max().item()
    assert scale > 0, f"{what}: vacuous reference"
    err = (out_t.double() - ref_t).abs().max().item()
    if out_t.dtype in (torch.float32, torch.float64):
        assert err <= 1e-5 * scale, f"{what}: fp32 error {err:.3g} vs max|ref| {scale:.3g}"
        return
    low = ref_fn(*args, **kwargs)
    low_t = low[0] if isinstance(low, tuple) else low
    err_pt = (low_t.double() - ref_t).abs().max().item()
    floor = 2 * torch.finfo(out_t.dtype).eps * scale
    assert err <= 2 * err_pt + floor, f"{what}: {out_t.dtype} error {err:.3g}, torch {err_pt:.3g}"


def assert_compiled_matches_eager(fn, compiled, args, leaves):
    """compiled(*args) equals fn(*args) (torch.testing's defaults for the dtype), and so do the
    gradients of `leaves` under a loss that weights fn's first two outputs differently."""
    eager, comp = fn(*args), compiled(*args)
    for e, o in zip(eager, comp, strict=True):
        torch.testing.assert_close(o, e)
    ge = torch.autograd.grad(eager[0].sum() + eager[1].square().sum(), leaves)
    gc = torch.autograd.grad(comp[0].sum() + comp[1].square().sum(), leaves)
    for e, o in zip(ge, gc, strict=True):
        assert e.abs().max() > 0
        torch.testing.assert_close(o, e)
    return eager

