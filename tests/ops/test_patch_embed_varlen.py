"""patch_embed on a list of images of different sizes (packed tokens + cu_seqlens): equal to the
per-image calls, gradients equal to the summed per-image gradients, gradcheck, opcheck, compile,
hypothesis fuzz against the float64 reference (G12), bad inputs on real / meta / fake tensors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from patch_embed_testing import FLAVOURS, assert_close_two_tier, make_params, make_pixels
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import vlmkern
from vlmkern import reference

varlen_op = torch.ops.vlmkern.patch_embed_varlen
SIZES = [(14, 21), (7, 7), (28, 14), (21, 21)]  # P = 7: grids 2x3, 1x1, 4x2, 3x3


def _setup(dtype=torch.float32, cls=True, bias=True, channels_last=False, grad=False,
           sizes=SIZES, D=16):
    images = [torch.randn((h, w, 3) if channels_last else (3, h, w)).to(dtype) for h, w in sizes]
    weight = (torch.randn(D, 3, 7, 7) * 0.1).to(dtype)
    params = {"bias": torch.randn(D).to(dtype) if bias else None,
              "pos_embed": torch.randn(9 + cls, D).to(dtype),
              "cls_token": torch.randn(D).to(dtype) if cls else None}
    if grad:
        images = [im.requires_grad_() for im in images]
        weight.requires_grad_()
        params = {k: v.requires_grad_() if v is not None else None for k, v in params.items()}
    return images, weight, params


def _per_image(images, weight, params, channels_last):
    outs = []
    for im in images:
        batch = im.unsqueeze(0)
        outs.append(vlmkern.ops.patch_embed(batch, weight, params["bias"],
                                            pos_embed=params["pos_embed"],
                                            cls_token=params["cls_token"],
                                            channels_last=channels_last)[0])
    return outs


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("cls", "bias"), [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_equals_per_image_calls(dtype, cls, bias, channels_last):
    images, weight, params = _setup(dtype, cls, bias, channels_last)
    tokens, cu = vlmkern.ops.patch_embed(images, weight, **params, channels_last=channels_last)
    singles = _per_image(images, weight, params, channels_last)
    lengths = [s.shape[0] for s in singles]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *torch.tensor(lengths).cumsum(0)]
    assert torch.equal(tokens, torch.cat(singles))
    for i, im in enumerate(images):  # and each block against the float64 reference
        batch = im.unsqueeze(0)
        assert_close_two_tier(tokens[cu[i] : cu[i + 1]].unsqueeze(0), (batch, weight,
                              params["bias"]), {"pos_embed": params["pos_embed"],
                              "cls_token": params["cls_token"], "channels_last": channels_last})


def test_varlen_uint8_crop_and_empty_list():
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((16, 9), (30, 23))]
    weight = torch.randn(8, 3, 7, 7) * 0.1
    norm = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.25], "rescale": 1 / 255}
    tokens, cu = vlmkern.ops.patch_embed(images, weight, crop=True, **norm)
    singles = [vlmkern.ops.patch_embed(im[None], weight, crop=True, **norm)[0] for im in images]
    assert cu.tolist() == [0, 2, 2 + 12]
    assert torch.equal(tokens, torch.cat(singles))
    empty, cu0 = vlmkern.ops.patch_embed([], weight)
    assert empty.shape == (0, 8) and cu0.tolist() == [0]


@pytest.mark.parametrize("channels_last", [False, True])
def test_varlen_gradients_equal_per_image_sums(channels_last):
    images, weight, params = _setup(grad=True, channels_last=channels_last)
    tokens, _ = vlmkern.ops.patch_embed(images, weight, **params, channels_last=channels_last)
    g = torch.randn_like(tokens)
    leaves = [*images, weight, *params.values()]
    got = torch.autograd.grad(tokens, leaves, g)
    want = torch.autograd.grad(torch.cat(_per_image(images, weight, params, channels_last)),
                               leaves, g)
    for a, b in zip(got, want, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_varlen_gradcheck():
    images, weight, params = _setup(torch.float64, grad=True, sizes=[(14, 7), (7, 21)], D=3)

    def fn(a, b, w, bias, pos, cls):
        return vlmkern.ops.patch_embed([a, b], w, bias, pos_embed=pos, cls_token=cls)[0]

    assert torch.autograd.gradcheck(fn, (*images, weight, *params.values()), fast_mode=True)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("sample", ["clip", "siglip-nhwc", "empty", "strided"])
def test_varlen_opcheck(sample, grad):
    cl = sample == "siglip-nhwc"
    images, weight, params = _setup(cls=sample != "siglip-nhwc", channels_last=cl, grad=grad)
    if sample == "empty":
        images = []
    if sample == "strided":
        images = [torch.randn(3, h, 2 * w)[..., ::2].requires_grad_(grad) for h, w in SIZES]
    args = (images, weight, params["bias"], params["pos_embed"], params["cls_token"], None, None,
            1.0, cl, "bicubic")
    torch.library.opcheck(varlen_op.default, args)


def test_varlen_torch_compile():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    images, weight, params = _setup(grad=True)

    def fn(a, b, w):
        return vlmkern.ops.patch_embed([a, b], w, **params)[0] * 2

    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for h in (7, 14, 21, 28):
        a = torch.randn(3, h, 14, requires_grad=True)
        b = torch.randn(3, 7, h, requires_grad=True)
        eager, comp = fn(a, b, weight), compiled(a, b, weight)
        torch.testing.assert_close(comp, eager)
        ge = torch.autograd.grad(eager.square().sum(), [a, b, weight])
        gc = torch.autograd.grad(comp.square().sum(), [a, b, weight])
        for e, c in zip(ge, gc, strict=True):
            torch.testing.assert_close(c, e)
    assert 1 <= counter.frame_count <= 2
    torch._dynamo.reset()


def _varlen_reference(images, weight, bias=None, **kwargs):
    """The per-image reference calls, tokens concatenated (cu_seqlens: None)."""
    outs = [reference.patch_embed(im[None], weight, bias, **kwargs)[0] for im in images]
    return (torch.cat(outs) if outs else weight.new_zeros((0, weight.shape[0]))), None


@settings(derandomize=True, max_examples=60, deadline=None, database=None)
@given(
    grids=st.lists(st.tuples(st.integers(0, 4), st.integers(1, 4)), min_size=1, max_size=3),
    empty=st.integers(0, 19), channels=st.integers(1, 4), patch=st.integers(1, 5),
    dim=st.integers(1, 33), flavour=st.sampled_from(list(FLAVOURS)), side=st.integers(1, 4),
    layout=st.sampled_from(["contiguous", "sliced", "channels_last", "nchw_strided_cl"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), uint8=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_varlen(grids, empty, channels, patch, dim, flavour, side, layout, dtype, uint8,
                     seed):
    """1-3 images with (gh, gw) grids, gh = 0 included, or an empty list when `empty` == 5
    (mid-range: hypothesis favours a range's ends); each image's positions bicubic-resized from
    one S*S table; against the per-image float64 references."""
    torch.manual_seed(seed)
    grids = grids if empty != 5 else []
    images, cl = [], False
    for gh, gw in grids:
        im, cl = make_pixels((1, channels, gh * patch, gw * patch), dtype, layout, uint8)
        images.append(im[0])
    weight, bias, pos, cls = make_params(channels, patch, dim, flavour, dtype, (side, side), side)
    kwargs = {"pos_embed": pos, "cls_token": cls, "channels_last": cl}
    if uint8:
        kwargs.update(mean=[0.5] * channels, std=[0.25] * channels, rescale=1 / 255)
    tokens, cu = vlmkern.ops.patch_embed(images, weight, bias, **kwargs)
    lengths = [(cls is not None) + gh * gw for gh, gw in grids]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert tokens.shape == (sum(lengths), dim) and tokens.dtype == dtype
    assert_close_two_tier(tokens, (images, weight, bias), kwargs, "varlen fuzz", _varlen_reference)


ERRORS = {  # id: (images (shape, dtype), message)
    "rank": ([((3, 14, 14), torch.float32), ((1, 3, 14, 14), torch.float32)],
             r"pixels\[1\] must be a 3-D tensor \(C, H, W\)"),
    "dtype-mix": ([((3, 14, 14), torch.float32), ((3, 14, 14), torch.uint8)],
                  r"pixels\[1\] dtype torch.uint8 differs from pixels\[0\]'s torch.float32"),
    "height": ([((3, 14, 14), torch.float32), ((3, 15, 14), torch.float32)],
               r"pixels height H=15 is not divisible by the patch size P=7"),
    "channels": ([((4, 14, 14), torch.float32)], r"pixels has C=4 channels but weight expects"),
}


@pytest.mark.parametrize("dev", ["cpu", "meta", "fake"])
@pytest.mark.parametrize("case", ERRORS)
def test_varlen_rejects_bad_input(case, dev):
    specs, match = ERRORS[case]
    mode = FakeTensorMode() if dev == "fake" else None

    def make(shape, dtype=torch.float32):
        t = torch.zeros(shape, dtype=dtype)
        return mode.from_tensor(t) if mode else t.to(dev)

    images = [make(s, d) for s, d in specs]
    with pytest.raises(RuntimeError, match=rf"^vlmkern\.patch_embed: {match}"):
        varlen_op(images, make((8, 3, 7, 7)))
