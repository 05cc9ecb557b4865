"""patch_embed autograd (gradcheck in float64, low-precision gradients vs the reference), opcheck
(G1), torch.compile (G11), unwritten outputs (G7), and bad inputs on real, meta and fake tensors
(G5). Forward numerics live in test_patch_embed.py."""

import pytest
import torch
from patch_embed_testing import assert_compiled_matches_eager, make_params, make_pixels
from testing_utils import deterministic_mode
from torch._dynamo.testing import CompileCounterWithBackend

import vlmkern
from vlmkern import reference

image_op = torch.ops.vlmkern.patch_embed
packed_op = torch.ops.vlmkern.patch_embed_packed
MEAN, STD = [0.48, 0.45, 0.41], [0.27, 0.26, 0.28]


def _image(dtype=torch.float64, B=2, H=6, W=4, P=2, D=3, side=2, flavour="internvit",
           layout="contiguous", grad=True):
    pixels, cl = make_pixels((B, 3, H, W), dtype, layout)
    weight, bias, pos, cls = make_params(3, P, D, flavour, dtype, (H // P, W // P), side)
    tensors = [pixels, weight, bias, pos, cls]
    if grad:
        tensors = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    return tensors, cl


def _packed(dtype=torch.float64, grid=((1, 2, 4), (2, 2, 2)), D=3, side=3, grad=True):
    grid = torch.tensor(grid, dtype=torch.int64).reshape(-1, 3)
    n = int(grid.prod(1).sum())
    weight = (torch.randn(D, 3, 2, 2, 2) * 0.3).to(dtype)
    tensors = [torch.randn(n, 3 * 2 * 2 * 2).to(dtype), weight, torch.randn(D).to(dtype),
               torch.randn(side * side, D).to(dtype) if side else None]
    if grad:
        tensors = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    return tensors, grid


# ---- autograd --------------------------------------------------------------------------------

GRAD_IMAGE = {  # id: (_image kwargs, op keywords)
    "internvit-resized": ({}, {}),
    "clip-nhwc-resized": ({"flavour": "clip", "layout": "channels_last"}, {}),
    "siglip-strided-native": ({"flavour": "siglip", "layout": "sliced", "H": 4, "W": 4}, {}),
    "float-normalized": ({"side": 3, "H": 6, "W": 6}, {"mean": MEAN, "std": STD, "rescale": 0.5}),
    "pos-none-nonsquare": ({"flavour": "siglip", "side": (3, 2)}, {"pos_interp": "none"}),
}


@pytest.mark.parametrize("case", GRAD_IMAGE)
def test_gradcheck_image(case):
    kw, op_kw = GRAD_IMAGE[case]
    (pixels, weight, bias, pos, cls), cl = _image(**kw)

    def fn(x, w, b, p, c):
        return vlmkern.ops.patch_embed(x, w, b, pos_embed=p, cls_token=c, channels_last=cl,
                                       **op_kw)

    assert torch.autograd.gradcheck(fn, (pixels, weight, bias, pos, cls), fast_mode=True)


def test_gradcheck_uint8_parameters():
    (_, weight, bias, pos, cls), _ = _image()
    u8 = torch.randint(0, 256, (2, 3, 6, 4), dtype=torch.uint8)

    def fn(w, b, p, c):
        return vlmkern.ops.patch_embed(u8, w, b, pos_embed=p, cls_token=c, mean=MEAN, std=STD,
                                       rescale=1 / 255)

    assert torch.autograd.gradcheck(fn, (weight, bias, pos, cls))


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("merge", [1, 2])
def test_gradcheck_packed(merge, norm):
    (patches, weight, bias, pos), grid = _packed()
    kw = {"mean": MEAN, "std": STD} if norm else {}

    def fn(x, w, b, p):
        return vlmkern.ops.patch_embed(x, w, b, pos_embed=p, grid_thw=grid,
                                       spatial_merge_size=merge, **kw)[0]

    assert torch.autograd.gradcheck(fn, (patches, weight, bias, pos), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["image", "packed"])
def test_gradients_match_reference(mode, dtype):
    """Every gradient vs the float64 reference's; bf16 within 3x the reference run in bf16."""
    if mode == "image":
        (x, w, b, p, c), _ = _image(dtype, B=3, H=14, W=21, P=7, D=16, side=4)
        kw = {"pos_embed": p, "cls_token": c}
        leaves = [x, w, b, p, c]
    else:
        (x, w, b, p), grid = _packed(dtype, grid=((1, 4, 6), (2, 2, 2)), D=16, side=5)
        kw = {"pos_embed": p, "grid_thw": grid, "spatial_merge_size": 2}
        leaves = [x, w, b, p]

    def grads(fn, tensors):
        args = dict(zip(["x", "w", "b", "p", "c"], tensors, strict=False))
        kws = {**kw, "pos_embed": args["p"]}
        if "c" in args:
            kws["cls_token"] = args["c"]
        out = fn(args["x"], args["w"], args["b"], **kws)
        out = out[0] if isinstance(out, tuple) else out
        gen = torch.Generator().manual_seed(1)
        g = torch.randn(out.shape, generator=gen).to(out.dtype)
        return torch.autograd.grad(out, tensors, g)

    ours = grads(vlmkern.ops.patch_embed, leaves)
    ref64 = grads(reference.patch_embed, [t.detach().double().requires_grad_() for t in leaves])
    low = grads(reference.patch_embed, [t.detach().clone().requires_grad_() for t in leaves])
    for name, o, r, lo in zip("xwbpc", ours, ref64, low, strict=False):
        scale = r.abs().max().item()
        assert scale > 0, name
        err = (o.double() - r).abs().max().item()
        if dtype == torch.float32:
            assert err <= 1e-5 * scale, f"d{name}: {err:.3g} vs {scale:.3g}"
        else:
            err_pt = (lo.double() - r).abs().max().item()
            assert err <= 3 * err_pt + 4 * torch.finfo(dtype).eps * scale, f"d{name}"


# ---- opcheck (G1) -----------------------------------------------------------------------------


def _image_samples():
    out = []
    for grad in (True, False):
        (x, w, b, p, c), cl = _image(torch.float32, grad=grad)
        out.append(((x, w, b, p, c, None, None, 1.0, cl, "bicubic"), f"internvit-grad{grad}"))
    (x, w, b, p, c), cl = _image(torch.float32, B=0)
    out.append(((x, w, b, p, c, None, None, 1.0, cl, "bicubic"), "empty-batch"))
    (x, w, b, p, c), cl = _image(torch.float32, flavour="clip", layout="channels_last")
    out.append(((x, w, b, p, c, None, None, 1.0, cl, "bicubic"), "nhwc-clip"))
    (x, w, b, p, c), cl = _image(torch.float32, flavour="siglip", layout="sliced", side=(3, 2))
    out.append(((x, w, b, p, c, MEAN, STD, 0.5, cl, "none"), "strided-normalized"))
    (_, w, b, p, c), _ = _image(torch.float32)
    u8 = torch.randint(0, 256, (2, 3, 6, 4), dtype=torch.uint8)
    out.append(((u8, w, b, p, c, MEAN, STD, 1 / 255, False, "bicubic"), "uint8"))
    return out


def _packed_samples():
    out = []
    for grad in (True, False):
        (x, w, b, p), grid = _packed(torch.float32, grad=grad)
        out.append(((x, w, b, grid, p, 2, None, None, 1.0), f"qwen3-grad{grad}"))
    (x, w, b, p), grid = _packed(torch.float32, grid=())
    out.append(((x, w, b, grid, p, 2, None, None, 1.0), "empty"))
    (x, w, _, _), grid = _packed(torch.float32, side=None)
    out.append(((torch.randn(x.shape[0], 2 * x.shape[1])[:, ::2], w, None, grid.int(), None, 1,
                 MEAN, STD, 0.5), "strided-qwen2-normalized"))
    u8 = torch.randint(0, 256, x.shape, dtype=torch.uint8)
    out.append(((u8, w, None, grid, None, 1, MEAN, STD, 1 / 255), "uint8"))
    return out


def _ids(v):
    return v if isinstance(v, str) else ""


@pytest.mark.parametrize(("args", "name"), _image_samples(), ids=_ids)
def test_opcheck_image(args, name):
    torch.library.opcheck(image_op.default, args)


@pytest.mark.parametrize(("args", "name"), _packed_samples(), ids=_ids)
def test_opcheck_packed(args, name):
    torch.library.opcheck(packed_op.default, args)


def test_opcheck_backward_ops():
    (x, w, b, p, c), _ = _image(torch.float32, grad=False)
    g = torch.randn(2, 1 + 6, 3)
    for mask in ([True] * 5, [False, True, False, True, False]):
        torch.library.opcheck(torch.ops.vlmkern.patch_embed_backward.default,
                              (g, x, w, True, p, True, None, None, 1.0, False, "bicubic", mask))
    (x, w, b, p), grid = _packed(torch.float32, grad=False)
    g = torch.randn(x.shape[0], 3)
    for mask in ([True] * 4, [False, False, True, True]):
        torch.library.opcheck(torch.ops.vlmkern.patch_embed_packed_backward.default,
                              (g, x, w, True, grid, p, 2, MEAN, STD, 1.0, mask))


# ---- torch.compile (G11) -----------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _vision_stem(pixels, weight, bias, pos, cls, patches, weight3, grid):
    a = vlmkern.ops.patch_embed(pixels, weight, bias, pos_embed=pos, cls_token=cls)
    b, cu = vlmkern.ops.patch_embed(patches, weight3, pos_embed=None, grid_thw=grid)
    return a * 2, b, cu


def test_torch_compile(fresh_dynamo):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_vision_stem, backend=counter, fullgraph=True)
    (_, w, b, p, c), _ = _image(torch.float32)
    (_, w3, _, _), _ = _packed(torch.float32)
    for B in (1, 2, 3, 4):
        pixels = torch.randn(B, 3, 6, 4, requires_grad=True)
        grid = torch.tensor([[1, 2, 2]] * B)
        patches = torch.randn(4 * B, w3[0].numel(), requires_grad=True)
        args = (pixels, w, b, p, c, patches, w3, grid)
        assert_compiled_matches_eager(_vision_stem, compiled, args,
                                      [pixels, w, b, p, c, patches, w3])  # fmt: skip
    assert 1 <= counter.frame_count <= 2
    targets = {str(n.target) for g in counter.graphs for n in g.graph.nodes}
    assert {"vlmkern.patch_embed", "vlmkern.patch_embed_packed"} <= targets


# ---- every output element written (G7) ----------------------------------------------------------


def test_every_output_element_is_written():
    with deterministic_mode():
        assert torch.empty(4).isnan().all()
        for flavour in ("clip", "siglip", "cls-only", "mllama"):
            (x, w, b, p, c), cl = _image(torch.float32, flavour=flavour, layout="channels_last")
            out = vlmkern.ops.patch_embed(x, w, b, pos_embed=p, cls_token=c, channels_last=cl)
            assert not out.isnan().any()
            grads = torch.autograd.grad(out.sum(), [t for t in (x, w, b, p, c) if t is not None])
            assert not any(g.isnan().any() for g in grads)
        (x, w, b, p), grid = _packed(torch.float32)
        tokens, cu = vlmkern.ops.patch_embed(x, w, b, pos_embed=p, grid_thw=grid,
                                             spatial_merge_size=2)
        assert not tokens.isnan().any() and cu[0] == 0
        grads = torch.autograd.grad(tokens.sum(), [x, w, b, p])
        assert not any(g.isnan().any() for g in grads)
