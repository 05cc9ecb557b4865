"""patch_embed bad inputs (G5): every check raises a `vlmkern.patch_embed: ...` message naming the
argument, identically from the C++ kernels (cpu, cuda) and the fake kernel (meta, FakeTensor);
wrapper-level errors; grid_thw value checks (CPU only, CUDA never syncs for them)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vlmkern

image_op = torch.ops.vlmkern.patch_embed
packed_op = torch.ops.vlmkern.patch_embed_packed
ERROR_DEVICES = ["cpu", "meta", "fake", pytest.param("cuda", marks=pytest.mark.gpu)]
F32, F64, BF16, U8, I32 = torch.float32, torch.float64, torch.bfloat16, torch.uint8, torch.int32
NDIV = "is not divisible by the patch size"

# Image op. Base call: pixels (2, 3, 8, 8), weight (4, 3, 2, 2), no bias/pos/cls.
# id: (overrides {arg: shape or (shape, dtype) or value}, message)
IMAGE_ERRORS = {
    "pixels-3d": ({"pixels": (3, 8, 8)}, r"pixels must be a 4-D tensor \(B, C, H, W\)"),
    "pixels-nhwc-5d": ({"pixels": (1, 2, 8, 8, 3), "channels_last": True},
                       r"pixels must be a 4-D tensor \(B, H, W, C\)"),
    "weight-3d": ({"weight": (4, 3, 2)}, r"weight must be a 4-D tensor \(D, C, P, P\)"),
    "weight-int": ({"weight": ((4, 3, 2, 2), I32)}, r"weight must be float32, float64, float16"),
    "pixels-int32": ({"pixels": ((2, 3, 8, 8), I32)},
                     r"pixels must be uint8 or weight's dtype torch.float32, got torch.int32"),
    "pixels-dtype-mix": ({"pixels": ((2, 3, 8, 8), BF16)},
                         r"pixels must be uint8 or weight's dtype torch.float32, got "
                         r"torch.bfloat16"),
    "nonsquare-patch": ({"weight": (4, 3, 2, 4)}, r"weight must have a square patch"),
    "channels": ({"pixels": (2, 4, 8, 8)}, r"pixels has C=4 channels but weight expects C=3"),
    "channels-nhwc": ({"pixels": (2, 8, 8, 1), "channels_last": True},
                      r"pixels has C=1 channels but weight expects C=3"),
    "height": ({"pixels": (2, 3, 9, 8)}, rf"pixels height H=9 {NDIV} P=2"),
    "width": ({"pixels": (2, 3, 8, 7)}, rf"pixels width W=7 {NDIV} P=2"),
    "bias-2d": ({"bias": (1, 4)}, r"bias must be a 1-D tensor \(D,\)"),
    "bias-dtype": ({"bias": ((4,), F64)},
                   r"bias dtype torch.float64 does not match weight dtype torch.float32"),
    "bias-width": ({"bias": (5,)}, r"bias has width 5 but weight has D=4 outputs"),
    "pos-1d": ({"pos_embed": (16,)}, r"pos_embed must be a 2-D tensor \(L, D\)"),
    "pos-width": ({"pos_embed": (16, 3)}, r"pos_embed has width 3 but weight has D=4"),
    "pos-not-square": ({"pos_embed": (15, 4)}, r"pos_embed has 15 rows: not a square S\*S"),
    "pos-not-square-cls": ({"pos_embed": (16, 4), "cls_token": (4,)},
                           r"pos_embed has 16 rows: not a square S\*S table \+ 1 \(CLS\)"),
    "pos-empty-cls": ({"pos_embed": (0, 4), "cls_token": (4,)},
                      r"pos_embed has 0 rows: it needs at least 1 patch position \+ 1 \(CLS\)"),
    "pos-none-rows": ({"pos_embed": (9, 4), "pos_interp": "none"},
                      r"pos_embed has 9 rows but the \(4, 4\) grid needs 16"),
    "pos-interp": ({"pos_interp": "bilinear"}, r"pos_interp must be 'bicubic' or 'none'"),
    "cls-2d": ({"cls_token": (1, 4)}, r"cls_token must be a 1-D tensor \(D,\)"),
    "cls-width": ({"cls_token": (3,)}, r"cls_token has width 3 but weight has D=4"),
    "cls-dtype": ({"cls_token": ((4,), BF16)}, r"cls_token dtype torch.bfloat16 does not match"),
    "mean-len": ({"mean": [0.5, 0.5]}, r"mean has 2 values but there are C=3 channels"),
    "mean-nan": ({"mean": [0.5, float("nan"), 0.5]},
                 r"mean must be finite, got nan at channel 1"),
    "std-len": ({"std": [0.5] * 4}, r"std has 4 values but there are C=3 channels"),
    "std-zero": ({"std": [0.5, 0.0, 0.5]}, r"std must be finite and nonzero"),
    "rescale-zero": ({"rescale": 0.0}, r"rescale must be finite and nonzero"),
}
IMAGE_ARGS = ["pixels", "weight", "bias", "pos_embed", "cls_token", "mean", "std", "rescale",
              "channels_last", "pos_interp"]
IMAGE_BASE = {"pixels": (2, 3, 8, 8), "weight": (4, 3, 2, 2), "bias": None, "pos_embed": None,
              "cls_token": None, "mean": None, "std": None, "rescale": 1.0,
              "channels_last": False, "pos_interp": "bicubic"}


def _tensor(spec, dev, mode):
    shape, dtype = spec if isinstance(spec[0], tuple) else (spec, F32)
    t = torch.zeros(shape, dtype=dtype)
    if dev == "fake":
        return mode.from_tensor(t)
    return t.to(dev)


def _args(base, overrides, names, dev, tensor_args):
    mode = FakeTensorMode() if dev == "fake" else None
    spec = {**base, **overrides}
    return [_tensor(spec[n], dev, mode) if n in tensor_args and spec[n] is not None else spec[n]
            for n in names], mode


@pytest.mark.parametrize("dev", ERROR_DEVICES)
@pytest.mark.parametrize("case", IMAGE_ERRORS)
def test_image_op_rejects_bad_input(case, dev):
    overrides, match = IMAGE_ERRORS[case]
    args, _ = _args(IMAGE_BASE, overrides, IMAGE_ARGS, dev, IMAGE_ARGS[:5])
    with pytest.raises(RuntimeError, match=rf"^vlmkern\.patch_embed: {match}"):
        image_op(*args)


PACKED_ERRORS = {
    "patches-3d": ({"patches": (2, 8, 24)}, r"patches must be a 2-D tensor \(N, C\*T\*P\*P\)"),
    "weight-4d": ({"weight": (4, 3, 2, 2)}, r"weight must be a 5-D tensor \(D, C, T, P, P\)"),
    "weight-nonsquare": ({"weight": (4, 3, 2, 2, 1)}, r"weight must be \(D, C, T, P, P\)"),
    "patches-width": ({"patches": (16, 20)},
                      r"patches has 20 values per row but weight needs C\*T\*P\*P=24"),
    "patches-int": ({"patches": ((16, 24), I32)}, r"patches must be uint8 or weight's dtype"),
    "grid-1d": ({"grid_thw": ((3,), torch.int64)}, r"grid_thw must be a 2-D tensor \(n, 3\)"),
    "grid-cols": ({"grid_thw": ((2, 2), torch.int64)}, r"grid_thw must have 3 columns"),
    "grid-float": ({"grid_thw": ((2, 3), F32)}, r"grid_thw must be int32 or int64"),
    "grid-empty": ({"grid_thw": ((0, 3), torch.int64)}, r"grid_thw has no rows but patches"),
    "merge-0": ({"spatial_merge_size": 0}, r"spatial_merge_size must be >= 1, got 0"),
    "bias-width": ({"bias": (3,)}, r"bias has width 3 but weight has D=4"),
    "pos-not-square": ({"pos_embed": (8, 4)}, r"pos_embed has 8 rows: not a square S\*S"),
    "pos-dtype": ({"pos_embed": ((9, 4), BF16)}, r"pos_embed dtype torch.bfloat16 does not"),
    "mean-len": ({"mean": [0.5]}, r"mean has 1 values but there are C=3 channels"),
    "mean-inf": ({"mean": [0.5, 0.5, float("inf")]}, r"mean must be finite, got inf at channel 2"),
}
PACKED_ARGS = ["patches", "weight", "bias", "grid_thw", "pos_embed", "spatial_merge_size",
               "mean", "std", "rescale"]
PACKED_BASE = {"patches": (16, 24), "weight": (4, 3, 2, 2, 2), "bias": None,
               "grid_thw": ((2, 3), torch.int64), "pos_embed": None, "spatial_merge_size": 2,
               "mean": None, "std": None, "rescale": 1.0}


@pytest.mark.parametrize("dev", ERROR_DEVICES)
@pytest.mark.parametrize("case", PACKED_ERRORS)
def test_packed_op_rejects_bad_input(case, dev):
    overrides, match = PACKED_ERRORS[case]
    args, _ = _args(PACKED_BASE, overrides, PACKED_ARGS, dev, PACKED_ARGS[:5])
    with pytest.raises(RuntimeError, match=rf"^vlmkern\.patch_embed: {match}"):
        packed_op(*args)


@pytest.mark.parametrize("arg", ["weight", "bias", "pos_embed", "cls_token"])
@pytest.mark.parametrize(("dev", "odd"), [("cpu", "meta"), ("meta", "cpu")])
def test_mixed_devices_are_rejected(arg, dev, odd):
    """One tensor on another device (meta vs cpu); for weight, bias/pos/cls follow it."""
    base = {**IMAGE_BASE, "bias": (4,), "pos_embed": (17, 4), "cls_token": (4,)}
    args, _ = _args(base, {}, IMAGE_ARGS, dev, IMAGE_ARGS[:5])
    moved = ["weight", "bias", "pos_embed", "cls_token"] if arg == "weight" else [arg]
    for name in moved:
        i = IMAGE_ARGS.index(name)
        args[i] = torch.zeros(args[i].shape, device=odd)
    other = "pixels" if arg == "weight" else "weight"
    with pytest.raises(RuntimeError, match=rf"{arg} is on {odd} but {other} is on {dev}"):
        image_op(*args)


def test_packed_grid_on_other_device_is_rejected():
    with pytest.raises(RuntimeError, match=r"grid_thw is on meta but patches is on cpu"):
        packed_op(torch.zeros(16, 24), torch.zeros(4, 3, 2, 2, 2), None,
                  torch.zeros(2, 3, dtype=torch.int64, device="meta"))


GRID_VALUE_ERRORS = {  # CPU only: the values of grid_thw (CUDA never reads them back)
    "sum": ([[1, 2, 2], [1, 2, 2]], None, r"grid_thw covers 8 patches but patches has N=16"),
    "non-positive": ([[1, 4, 4], [0, 2, 2]], None, r"grid_thw row 1 = \(0, 2, 2\) must be"),
    "merge": ([[1, 2, 6], [1, 1, 4]], (9, 4), r"grid_thw row 1: h=1, w=4 are not divisible"),
}


@pytest.mark.parametrize("case", GRID_VALUE_ERRORS)
def test_packed_grid_values_checked_on_cpu(case):
    grid, pos, match = GRID_VALUE_ERRORS[case]
    pos = torch.zeros(pos) if pos else None
    with pytest.raises(RuntimeError, match=rf"^vlmkern\.patch_embed: {match}"):
        packed_op(torch.zeros(16, 24), torch.zeros(4, 3, 2, 2, 2), None, torch.tensor(grid), pos,
                  2)


WRAPPER_ERRORS = {  # id: (kwargs beyond pixels/weight, message)
    "packed-pos-interp": ({"grid_thw": torch.tensor([[1, 4, 4]]), "pos_interp": "bicubic"},
                          r".*pos_interp must be None or 'bilinear'"),
    "packed-cls": ({"grid_thw": torch.tensor([[1, 4, 4]]), "cls_token": torch.zeros(4)},
                   r"cls_token and channels_last are image-mode only"),
    "patch-size": ({"patch_size": 14}, r"patch_size=14 but weight has 2"),
    "temporal": ({"grid_thw": torch.tensor([[1, 4, 4]]), "temporal_patch_size": 1},
                 r"temporal_patch_size=1 but weight has 2"),
}


@pytest.mark.parametrize("case", WRAPPER_ERRORS)
def test_wrapper_rejects_bad_arguments(case):
    kwargs, match = WRAPPER_ERRORS[case]
    packed = "grid_thw" in kwargs
    pixels = torch.zeros(16, 24) if packed else torch.zeros(1, 3, 8, 8)
    weight = torch.zeros(4, 3, 2, 2, 2) if packed else torch.zeros(4, 3, 2, 2)
    with pytest.raises(ValueError, match=rf"^vlmkern\.patch_embed: {match}"):
        vlmkern.ops.patch_embed(pixels, weight, **kwargs)


@pytest.mark.parametrize("dev", ["cpu", "meta"])
def test_backward_rejects_uint8_pixel_gradient_and_bad_grad(dev):
    u8 = torch.zeros(1, 3, 4, 4, dtype=torch.uint8, device=dev)
    w = torch.zeros(2, 3, 2, 2, device=dev)
    args = (u8, w, False, None, False, None, None, 1.0, False, "bicubic")
    good = torch.zeros(1, 4, 2, device=dev)
    with pytest.raises(RuntimeError, match=r"pixels is uint8: it has no gradient"):
        torch.ops.vlmkern.patch_embed_backward(good, *args, [True, True, False, False, False])
    with pytest.raises(RuntimeError, match=r"grad must have shape \[1, 4, 2\], got \[1, 5, 2\]"):
        torch.ops.vlmkern.patch_embed_backward(torch.zeros(1, 5, 2, device=dev), *args,
                                               [False, True, False, False, False])
