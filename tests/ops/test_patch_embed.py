"""patch_embed forward numerics (G3/G4/G12): image mode on every shape x dtype x layout x model
flavour against the float64 reference, resized positions, uint8 + folded normalization, packed
Qwen2-VL / Qwen3-VL rows, packed batches vs per-image calls, fuzz of both modes. Autograd,
opcheck, compile: test_patch_embed_checks.py; bad inputs: test_patch_embed_errors.py; variable-size
image lists: test_patch_embed_varlen.py; HF modules: tests/nn/test_patch_embed_modules.py."""

import itertools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from patch_embed_testing import (
    FLAVOURS,
    IMAGE_SHAPES,
    LAYOUTS,
    assert_close_two_tier,
    make_params,
    make_pixels,
)
from testing_utils import FLOATS

import vlmkern
from vlmkern import reference

# Each real shape runs as its own model: CLIP (CLS + positions, no bias), SigLIP (bias +
# positions), InternViT (bias + CLS + positions), Mllama (a bias-free conv; its CLS and tile
# positions are added after the op). The synthetic shapes cycle through every flavour.
REAL_FLAVOUR = {"clip-l14-336": "clip", "siglip-so400m": "siglip", "internvit-448": "internvit",
                "mllama-560": "mllama"}
REAL = set(REAL_FLAVOUR)
SYNTHETIC = [name for name in IMAGE_SHAPES if name not in REAL]
FLAVOUR_OF = {**dict(zip(SYNTHETIC, itertools.cycle(FLAVOURS))), **REAL_FLAVOUR}


def test_shape_flavours():
    """Every flavour runs on some synthetic shape; the real shapes have their model's flavour."""
    assert {FLAVOUR_OF[name] for name in SYNTHETIC} == set(FLAVOURS)
    assert {name: FLAVOURS[FLAVOUR_OF[name]] for name in REAL} == {  # (bias, cls, positions)
        "clip-l14-336": (False, True, True), "siglip-so400m": (True, False, True),
        "internvit-448": (True, True, True), "mllama-560": (False, False, False)}


def _image_case(name, dtype, layout, resize=False, uint8=False):
    """A square S*S table: S = the grid (no resize) or max(grid) + 2 (resize); a non-square grid
    without resize gets an exact (gh*gw, D) table and pos_interp='none'."""
    B, C, H, W, P, D = IMAGE_SHAPES[name]
    pixels, cl = make_pixels((B, C, H, W), dtype, layout, uint8)
    grid = (H // P, W // P)
    exact = not resize and grid[0] != grid[1]
    side = grid if exact else max(grid) + (2 if resize else 0)
    weight, bias, pos, cls = make_params(C, P, D, FLAVOUR_OF[name], dtype, grid, side)
    kwargs = {"pos_embed": pos, "cls_token": cls, "channels_last": cl}
    if pos is not None and exact:
        kwargs["pos_interp"] = "none"
    return (pixels, weight, bias), kwargs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", IMAGE_SHAPES)
def test_image_matches_reference(name, dtype, layout):
    if name in REAL and (layout not in ("contiguous", "channels_last") or dtype == torch.float16):
        pytest.skip("real shapes: two layouts, fp32 and bf16 (runtime)")
    args, kwargs = _image_case(name, dtype, layout)
    out = vlmkern.ops.patch_embed(*args, **kwargs)
    B, _, H, W, P, D = IMAGE_SHAPES[name]
    cls = kwargs["cls_token"] is not None
    assert out.shape == (B, int(cls) + (H // P) * (W // P), D) and out.dtype == dtype
    assert out.is_contiguous()
    assert_close_two_tier(out, args, kwargs, f"{name} {dtype} {layout}")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", ["clip-tiny", "odd-nonsquare", "c4", "odd-p3", "clip-l14-336"])
def test_resized_positions(name, dtype):
    """Bicubic resize (align_corners=False) of the S*S table to the image grid, CLS row kept."""
    args, kwargs = _image_case(name, dtype, "contiguous", resize=True)
    if kwargs["pos_embed"] is None:  # give every flavour a table here
        B, C, H, W, P, D = IMAGE_SHAPES[name]
        kwargs["pos_embed"] = torch.randn(5 * 5 + (kwargs["cls_token"] is not None), D).to(dtype)
    kwargs.pop("pos_interp", None)
    out = vlmkern.ops.patch_embed(*args, **kwargs)
    assert_close_two_tier(out, args, kwargs, f"{name} resized {dtype}")


def test_cls_row_is_cls_plus_first_position():
    args, kwargs = _image_case("clip-tiny", torch.float32, "contiguous")
    out = vlmkern.ops.patch_embed(*args, **kwargs)
    expected = kwargs["cls_token"] + kwargs["pos_embed"][0]
    assert torch.equal(out[:, 0], expected.expand(out.shape[0], -1))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("name", ["clip-tiny", "odd-nonsquare", "c4", "internvit-448"])
def test_uint8_with_folded_normalization(name, layout, dtype):
    """uint8 + rescale + per-channel mean/std == normalize (fp32) then embed."""
    if name in REAL and (layout != "contiguous" or dtype == torch.float16):
        pytest.skip("real shape: contiguous, fp32 and bf16 (runtime)")
    args, kwargs = _image_case(name, dtype, layout, uint8=True)
    C = IMAGE_SHAPES[name][1]
    kwargs.update(mean=[0.48, 0.45, 0.41, 0.5][:C], std=[0.27, 0.26, 0.28, 0.3][:C],
                  rescale=1 / 255)
    out = vlmkern.ops.patch_embed(*args, **kwargs)
    assert out.dtype == dtype
    assert_close_two_tier(out, args, kwargs, f"uint8 {name} {layout} {dtype}")


def test_float_pixels_with_normalization_and_dtype_cast():
    """Float pixels in [0, 1] with mean/std; fp32 pixels with bf16 weights are cast (HF)."""
    args, kwargs = _image_case("clip-tiny", torch.float32, "contiguous")
    pixels = args[0].sigmoid()
    kwargs.update(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    out = vlmkern.ops.patch_embed(pixels, *args[1:], **kwargs)
    assert_close_two_tier(out, (pixels, *args[1:]), kwargs, "float+norm")
    bf = [a.bfloat16() if a is not None else None for a in args[1:]]
    kw_bf = {k: v.bfloat16() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out_bf = vlmkern.ops.patch_embed(pixels, *bf, **kw_bf)
    assert out_bf.dtype == torch.bfloat16
    assert_close_two_tier(out_bf, (pixels.bfloat16(), *bf), kw_bf, "fp32 pixels, bf16 weights")


def test_crop_matches_valid_conv():
    """crop=True: SigLIP-so400m/14 at 384 -> 27x27 patches, trailing 6 pixels dropped."""
    pixels = torch.randn(1, 3, 40, 33)
    weight, bias = torch.randn(8, 3, 7, 7), torch.randn(8)
    out = vlmkern.ops.patch_embed(pixels, weight, bias, crop=True)
    ref = torch.nn.functional.conv2d(pixels, weight, bias, stride=7).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.shape == (1, 5 * 4, 8)


@pytest.mark.parametrize("name", ["clip-tiny", "odd-nonsquare", "internvit-448"])
def test_batch_equals_per_image_calls(name):
    args, kwargs = _image_case(name, torch.float32, "contiguous")
    out = vlmkern.ops.patch_embed(*args, **kwargs)
    for i in range(args[0].shape[0]):
        single = vlmkern.ops.patch_embed(args[0][i : i + 1], *args[1:], **kwargs)
        torch.testing.assert_close(out[i : i + 1], single, rtol=0, atol=0)


# ---- packed (Qwen) mode ------------------------------------------------------------------------

# name: (grid_thw, C, T, P, D, bias, table side S or None, spatial_merge_size)
PACKED = {
    "qwen2-tiny": ([[1, 4, 6], [2, 2, 2]], 3, 2, 4, 16, False, None, 2),
    "qwen3-tiny": ([[1, 4, 6], [2, 8, 4], [1, 2, 2]], 3, 2, 4, 32, True, 6, 2),
    "merge1-odd": ([[1, 3, 5], [1, 1, 1]], 3, 2, 2, 7, True, 4, 1),
    "one-row": ([[1, 1, 1]], 3, 1, 2, 5, True, 3, 1),
    "c1-t1": ([[2, 2, 4]], 1, 1, 3, 9, False, 2, 2),
    "empty": ([], 3, 2, 4, 8, True, 4, 2),
    "qwen2-vl-448x644": ([[1, 32, 46]], 3, 2, 14, 1280, False, None, 2),
    "qwen3-vl": ([[1, 32, 48], [2, 12, 10]], 3, 2, 16, 1152, True, 48, 2),
}
PACKED_LAYOUTS = ["contiguous", "row_strided", "col_strided"]


def _packed_case(name, dtype, layout="contiguous", uint8=False):
    grid, *sizes = PACKED[name]
    grid = torch.tensor(grid, dtype=torch.int64).reshape(-1, 3)
    return _packed_inputs(grid, *sizes, dtype, layout, uint8)


def _packed_inputs(grid, C, T, P, D, has_bias, side, merge, dtype, layout, uint8):
    """((patches (N, C·T·P·P) in `layout`, weight, bias), op keywords) for grid_thw `grid`."""
    n, k = int(grid.prod(1).sum()), C * T * P * P
    rows = {"contiguous": (n, k), "row_strided": (2 * n, k), "col_strided": (n, 2 * k)}[layout]
    base = torch.randint(0, 256, rows, dtype=torch.uint8) if uint8 else torch.randn(rows).to(dtype)
    patches = {"contiguous": base, "row_strided": base[::2], "col_strided": base[:, ::2]}[layout]
    weight = (torch.randn(D, C, T, P, P) * 0.3).to(dtype)
    bias = torch.randn(D).to(dtype) if has_bias else None
    pos = torch.randn(side * side, D).to(dtype) if side else None
    return (patches, weight, bias), {"grid_thw": grid, "pos_embed": pos,
                                     "spatial_merge_size": merge}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_last_weight_with_normalization(dtype):
    """A Conv weight in channels_last memory (model.to(memory_format=torch.channels_last)) folds
    the normalization like a contiguous one, in image and packed mode (up to the summation order
    of the bias correction)."""
    g = torch.Generator().manual_seed(3)
    norm = {"mean": [0.48, 0.45, 0.40], "std": [0.26, 0.26, 0.27], "rescale": 1 / 255}
    u8 = torch.randint(0, 256, (2, 3, 8, 12), generator=g, dtype=torch.uint8)
    w = (torch.randn(8, 3, 4, 4, generator=g) * 0.2).to(dtype)
    b = torch.randn(8, generator=g).to(dtype)
    cl = w.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    expected = vlmkern.ops.patch_embed(u8, w, b, **norm)
    assert expected.abs().max() > 0
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 0.07}
    torch.testing.assert_close(vlmkern.ops.patch_embed(u8, cl, b, **norm), expected, **tol)
    w3 = (torch.randn(8, 3, 2, 4, 4, generator=g) * 0.2).to(dtype)
    rows = torch.randint(0, 256, (24, 96), generator=g, dtype=torch.uint8)
    grid = torch.tensor([[1, 4, 6]])
    packed = vlmkern.ops.patch_embed(rows, w3, b, grid_thw=grid, **norm)[0]
    cl3 = w3.contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(vlmkern.ops.patch_embed(rows, cl3, b, grid_thw=grid, **norm)[0],
                               packed, **tol)  # fmt: skip


@pytest.mark.parametrize("layout", PACKED_LAYOUTS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", PACKED)
def test_packed_matches_reference(name, dtype, layout):
    if name in ("qwen2-vl-448x644", "qwen3-vl") and (
            layout != "contiguous" or dtype == torch.float16):
        pytest.skip("real shapes: contiguous, fp32 and bf16 (runtime)")
    args, kwargs = _packed_case(name, dtype, layout)
    tokens, cu = vlmkern.ops.patch_embed(*args, **kwargs)
    grid = kwargs["grid_thw"]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *grid.prod(1).cumsum(0).tolist()]
    assert tokens.shape == (args[0].shape[0], args[1].shape[0]) and tokens.dtype == dtype
    assert_close_two_tier(tokens, args, kwargs, f"{name} {dtype} {layout}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["qwen2-tiny", "qwen3-tiny", "merge1-odd"])
def test_packed_uint8_with_folded_normalization(name, dtype):
    args, kwargs = _packed_case(name, dtype, uint8=True)
    kwargs.update(mean=[0.48, 0.45, 0.41], std=[0.27, 0.26, 0.28], rescale=1 / 255)
    out = vlmkern.ops.patch_embed(*args, **kwargs)
    assert_close_two_tier(out, args, kwargs, f"packed uint8 {name} {dtype}")


@pytest.mark.parametrize("name", ["qwen2-tiny", "qwen3-tiny", "merge1-odd"])
def test_packed_batch_equals_per_image_calls(name):
    args, kwargs = _packed_case(name, torch.float32)
    tokens, cu = vlmkern.ops.patch_embed(*args, **kwargs)
    for i, row in enumerate(kwargs["grid_thw"]):
        lo, hi = cu[i].item(), cu[i + 1].item()
        single, single_cu = vlmkern.ops.patch_embed(
            args[0][lo:hi], *args[1:], **{**kwargs, "grid_thw": row[None]})
        assert single_cu.tolist() == [0, hi - lo]
        torch.testing.assert_close(tokens[lo:hi], single, rtol=1e-6, atol=1e-6)


def test_qwen2_conv3d_formula():
    """Qwen2-VL PatchEmbed: view(-1, 3, 2, 14, 14) -> Conv3d(k = s = (2, 14, 14)), no bias."""
    x, w = torch.randn(20, 3 * 2 * 14 * 14), torch.randn(64, 3, 2, 14, 14) * 0.1
    grid = torch.tensor([[1, 4, 5]])
    tokens, _ = vlmkern.ops.patch_embed(x, w, grid_thw=grid)
    ref = torch.nn.functional.conv3d(x.view(-1, 3, 2, 14, 14), w, stride=(2, 14, 14))
    torch.testing.assert_close(tokens, ref.view(-1, 64), rtol=1e-5, atol=1e-5)


# ---- hypothesis fuzz (G12) ----------------------------------------------------------------------


@settings(derandomize=True, max_examples=60, deadline=None, database=None)
@given(
    batch=st.integers(0, 3), channels=st.integers(1, 4), patch=st.integers(1, 5),
    gh=st.integers(0, 4), gw=st.integers(1, 4), dim=st.integers(1, 33),
    flavour=st.sampled_from(list(FLAVOURS)), resize=st.booleans(),
    layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    uint8=st.booleans(), seed=st.integers(0, 2**16),
)
def test_fuzz_image_mode(batch, channels, patch, gh, gw, dim, flavour, resize, layout, dtype,
                         uint8, seed):
    torch.manual_seed(seed)
    shape = (batch, channels, gh * patch, gw * patch)
    pixels, cl = make_pixels(shape, dtype, layout, uint8)
    side = (max(gh, gw) + 1) if resize else None
    if not resize and gh != gw:
        side = None
    weight, bias, pos, cls = make_params(channels, patch, dim, flavour, dtype, (gh, gw), side)
    kwargs = {"pos_embed": pos, "cls_token": cls, "channels_last": cl}
    if pos is not None and side is None:
        kwargs["pos_interp"] = "bicubic" if gh == gw else "none"
        if gh == gw:
            kwargs["pos_embed"] = torch.randn(gh * gh + (cls is not None), dim).to(dtype)
    if gh == 0 and kwargs["pos_embed"] is not None:
        kwargs["pos_embed"] = torch.randn(4 + (cls is not None), dim).to(dtype)
        kwargs["pos_interp"] = "bicubic"
    if uint8:
        kwargs.update(mean=[0.5] * channels, std=[0.25] * channels, rescale=1 / 255)
    out = vlmkern.ops.patch_embed(pixels, weight, bias, **kwargs)
    assert_close_two_tier(out, (pixels, weight, bias), kwargs, "fuzz")
    assert reference.patch_embed(pixels, weight, bias, **kwargs).shape == out.shape


@settings(derandomize=True, max_examples=60, deadline=None, database=None)
@given(
    entries=st.lists(st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)),
                     min_size=1, max_size=3),
    empty=st.integers(0, 19), merge=st.integers(1, 2), channels=st.integers(1, 3),
    temporal=st.integers(1, 2), patch=st.integers(1, 4), dim=st.integers(1, 33),
    bias=st.booleans(), side=st.sampled_from([None, 1, 2, 3, 5]),
    layout=st.sampled_from(PACKED_LAYOUTS), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    grid_dtype=st.sampled_from([torch.int32, torch.int64]), uint8=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(entries=[(1, 1, 1)], empty=5, merge=2, channels=3, temporal=2, patch=2, dim=8, bias=True,
         side=3, layout="row_strided", dtype=torch.bfloat16, grid_dtype=torch.int32, uint8=True,
         seed=0)  # always one N = 0 call
def test_fuzz_packed_mode(entries, empty, merge, channels, temporal, patch, dim, bias, side,
                          layout, dtype, grid_dtype, uint8, seed):
    """Packed (Qwen) rows: 1-3 grid_thw entries, or none (N = 0) when `empty` == 5 (mid-range:
    hypothesis favours a range's ends) and in the explicit example; h and w in merge blocks when
    the (S*S, D) table is resampled, any h and w otherwise."""
    torch.manual_seed(seed)
    unit = merge if side else 1
    grid = [[t, h * unit, w * unit] for t, h, w in entries] if empty != 5 else []
    grid_thw = torch.tensor(grid, dtype=grid_dtype).reshape(-1, 3)
    n = int(grid_thw.prod(1).sum())
    (patches, weight, b), kwargs = _packed_inputs(grid_thw, channels, temporal, patch, dim, bias,
                                                  side, merge, dtype, layout, uint8)
    if uint8:
        kwargs.update(mean=[0.5] * channels, std=[0.25] * channels, rescale=1 / 255)
    tokens, cu = vlmkern.ops.patch_embed(patches, weight, b, **kwargs)
    assert tokens.shape == (n, dim) and tokens.dtype == dtype
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *grid_thw.prod(1).cumsum(0).tolist()]
    assert_close_two_tier(tokens, (patches, weight, b), kwargs, "packed fuzz")
