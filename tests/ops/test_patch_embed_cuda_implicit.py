"""The implicit-GEMM patch embedding on CUDA (VLMKERN_PATCH_EMBED_GEMM=implicit; all `gpu`-marked,
skipped without a GPU; sm_90a only, the rest skip): the kernels run (profiler: patch_gemm_kernel
forward, patch_wgrad_kernel for dW, no patchify_kernel: no patch matrix), its tokens are within
2x and its dW within 3x the error of the default patchify + cuBLAS path against a float64
reference, for every pixel layout / dtype (uint8 with the normalization, whose dW needs the
normalized rows), tails in M, D and K, odd D (no paired stores; dW falls back), CLS rows,
bias-only and no-addend calls; CUDA-graph capture and bit-identical repeats (G8, G11); a bad
VLMKERN_PATCH_EMBED_GEMM value raises. Packed Qwen3-VL rows: one GEMM (shuffle_gemm_kernel at
r = 1) whose epilogue computes the bilinear positions + bias, against float64 and the default
position-rows + cuBLASLt path, its fallbacks, graphs and repeats."""

import pytest
import torch
from test_patch_embed_cuda import LAYOUTS, _pixels
from testing_utils import graph_replay, profiled_names

import vlmkern

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _sm90_only():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the implicit-GEMM kernel is sm_90a code")
    if not vlmkern.info()["cutlass_gemm"]:
        pytest.skip("built without the sm_90a CuTe kernels (gpu_check's info stage flags this)")


def _run(gemm, monkeypatch, *args, **kwargs):
    monkeypatch.setenv("VLMKERN_PATCH_EMBED_GEMM", gemm)
    return vlmkern.ops.patch_embed(*args, **kwargs)


def _check(monkeypatch, x, w, bias=None, x_cuda=None, **kwargs):
    """Implicit vs default path on CUDA, both against float64 on the CPU; the kernel must run.
    x_cuda: the pixels as the CUDA call sees them (a view taken on the device), default x.cuda()."""
    dev = [x.cuda() if x_cuda is None else x_cuda] + [None if t is None else t.cuda()
                                                      for t in (w, bias)]
    extra = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    ours = _run("implicit", monkeypatch, *dev, **extra)
    names = profiled_names(lambda: _run("implicit", monkeypatch, *dev, **extra))
    assert any("patch_gemm_kernel" in n for n in names), "the implicit kernel did not run"
    assert not any("patchify_kernel" in n for n in names), "a patch matrix was built"
    base = _run("lt", monkeypatch, *dev, **extra)
    f64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in kwargs.items()}
    xd = x if x.dtype == torch.uint8 else x.double()
    ref = vlmkern.ops.patch_embed(xd, w.double(), None if bias is None else bias.double(), **f64)
    assert ours.shape == ref.shape and ours.dtype == w.dtype
    err = (ours.cpu().double() - ref).abs().max().item()
    base_err = (base.cpu().double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 2 * base_err + 1e-3 * scale, (err, base_err, scale)
    _check_wgrad(monkeypatch, dev, xd, w, bias, extra, f64)
    return ours


def _check_wgrad(monkeypatch, dev, xd, w, bias, extra, f64):
    """dW from the implicit weight-gradient kernel (no patch matrix) within 3x the default path's
    error against float64 (G3's gradient rule); the kernel ran, the patchify kernel did not."""
    g = torch.randn(vlmkern.ops.patch_embed(*dev, **extra).shape,
                    generator=torch.Generator().manual_seed(9)).to(w.dtype)

    def dw(mode):
        monkeypatch.setenv("VLMKERN_PATCH_EMBED_GEMM", mode)
        wd = dev[1].detach().requires_grad_()
        out = vlmkern.ops.patch_embed(dev[0], wd, dev[2], **extra)
        return torch.autograd.grad(out, wd, g.cuda())[0]

    names = profiled_names(lambda: dw("implicit"))
    ours, base = dw("implicit"), dw("lt")
    if w.shape[0] % 8:  # D not a multiple of 8: 16-byte rows of G are not there, dW falls back
        assert not any("patch_wgrad_kernel" in n for n in names)
        assert torch.equal(ours, base)
        return
    assert any("patch_wgrad_kernel" in n for n in names), "the implicit dW kernel did not run"
    assert not any("patchify_kernel" in n for n in names), "a patch matrix was built"
    w64 = w.double().requires_grad_()
    out64 = vlmkern.ops.patch_embed(xd, w64, None if bias is None else bias.double(), **f64)
    ref = torch.autograd.grad(out64, w64, g.double())[0]
    err = (ours.cpu().double() - ref).abs().max().item()
    base_err = (base.cpu().double() - ref).abs().max().item()
    assert err <= 3 * base_err + 1e-3 * ref.abs().max().item(), (err, base_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("patch", [7, 14, 16])  # K = 147, 588 (kp 152, 592: a partial k tile), 768
@pytest.mark.parametrize("d", [200, 37])  # a partial n tile; odd D: single-element stores
def test_implicit_layouts(patch, layout, dtype, d, monkeypatch):
    g = torch.Generator().manual_seed(patch + d)
    b, gh, gw = 3, 5, 3  # M = 45 rows: one partial m tile; a non-square grid
    base, view, channels_last = _pixels(layout, b, max(gh, gw) * patch, dtype, g)
    hdim = 1 if channels_last else 2

    def pixels(t):  # offsets, gaps and crops taken on each device, so the kernel sees them
        return view(t).narrow(hdim, 0, gh * patch).narrow(hdim + 1, 0, gw * patch)

    w = (torch.randn(d, 3, patch, patch, generator=g) * 0.05).to(dtype)
    pos = torch.randn(1 + gh * gw, d, generator=g).to(dtype)
    cls = torch.randn(d, generator=g).to(dtype)
    bias = torch.randn(d, generator=g).to(dtype)
    norm = {}
    if layout.startswith("uint8"):
        norm = {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28], "rescale": 1 / 255}
    _check(monkeypatch, pixels(base), w, bias, x_cuda=pixels(base.cuda()), pos_embed=pos,
           cls_token=cls, pos_interp="none", channels_last=channels_last, crop=True, **norm)


@pytest.mark.parametrize("addend", ["none", "bias", "positions"])
def test_implicit_addends(addend, monkeypatch):
    """No addend (out written whole, one GEMM), a (D,) bias (row stride 0), resized positions."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 64, 48, generator=g).to(torch.bfloat16)
    w = (torch.randn(136, 3, 16, 16, generator=g) * 0.05).to(torch.bfloat16)
    bias = torch.randn(136, generator=g).to(torch.bfloat16) if addend != "none" else None
    pos = torch.randn(9, 136, generator=g).to(torch.bfloat16) if addend == "positions" else None
    _check(monkeypatch, x, w, bias, pos_embed=pos)


def test_implicit_clip_l_336(monkeypatch):
    """CLIP-L/14-336 at B 3 (M = 1728: 14 m tiles, 8 n tiles, 10 k tiles), uint8 NHWC pixels with
    the processor's normalization folded in, CLS, positions bicubic-resized from 16x16 to 24x24."""
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 256, (3, 336, 336, 3), generator=g, dtype=torch.uint8)
    w = (torch.randn(1024, 3, 14, 14, generator=g) * 0.02).to(torch.bfloat16)
    pos = torch.randn(1 + 256, 1024, generator=g).to(torch.bfloat16)
    cls = torch.randn(1024, generator=g).to(torch.bfloat16)
    _check(monkeypatch, x, w, None, pos_embed=pos, cls_token=cls, channels_last=True,
           mean=[0.4815, 0.4578, 0.4082], std=[0.2686, 0.2613, 0.2758], rescale=1 / 255)


@pytest.mark.parametrize(("b", "size", "patch", "d"), [
    (4, 256, 16, 4096),  # 192 output tiles: one split of 16 row tiles (tables reused in-loop)
    (3, 336, 14, 1024),  # CLIP-L: 40 tiles, several splits of 5 row tiles each
])
def test_implicit_wgrad_many_row_tiles(b, size, patch, d, monkeypatch):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(b, 3, size, size, generator=g).to(torch.bfloat16)
    w = (torch.randn(d, 3, patch, patch, generator=g) * 0.02).to(torch.bfloat16)
    bias = torch.randn(d, generator=g).to(torch.bfloat16)
    _check(monkeypatch, x, w, bias)


def test_implicit_varlen_images(monkeypatch):
    """A list of differently sized images (patch_embed_varlen) runs each image through the same
    image-mode path: the implicit forward and dW kernels run, and tokens / dW match the default
    path's within the tiers (positions bicubic-resized per image, CLS rows)."""
    g = torch.Generator().manual_seed(4)
    images = [torch.randn(3, h, w, generator=g).to(torch.bfloat16) for h, w in ((56, 42), (28, 70))]
    w = (torch.randn(136, 3, 14, 14, generator=g) * 0.05).to(torch.bfloat16).cuda()
    pos = torch.randn(17, 136, generator=g).to(torch.bfloat16).cuda()
    cls = torch.randn(136, generator=g).to(torch.bfloat16).cuda()
    dev = [im.cuda() for im in images]

    def run(mode):
        monkeypatch.setenv("VLMKERN_PATCH_EMBED_GEMM", mode)
        wd = w.detach().requires_grad_()
        tokens, cu = vlmkern.ops.patch_embed(dev, wd, None, pos_embed=pos, cls_token=cls)
        return tokens, cu, torch.autograd.grad(tokens, wd, torch.ones_like(tokens))[0]

    names = profiled_names(lambda: run("implicit"))
    assert any("patch_gemm_kernel" in n for n in names)
    assert any("patch_wgrad_kernel" in n for n in names)
    ours, base = run("implicit"), run("lt")
    assert torch.equal(ours[1], base[1])
    torch.testing.assert_close(ours[0].float(), base[0].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours[2].float(), base[2].float(), rtol=2e-2, atol=5e-2)


def test_implicit_graph_capture_and_repeats(monkeypatch):
    monkeypatch.setenv("VLMKERN_PATCH_EMBED_GEMM", "implicit")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 56, 56, generator=g).to(torch.bfloat16).cuda()
    w = (torch.randn(256, 3, 14, 14, generator=g) * 0.05).to(torch.bfloat16).cuda()
    pos = torch.randn(17, 256, generator=g).to(torch.bfloat16).cuda()
    cls = torch.randn(256, generator=g).to(torch.bfloat16).cuda()

    def step():
        return vlmkern.ops.patch_embed(x, w, None, pos_embed=pos, cls_token=cls)

    first = step()
    for _ in range(20):
        assert torch.equal(step(), first)
    assert torch.equal(graph_replay(step), first)

    # the backward's dW kernel (workspace, split count, attributes) inside a capture too
    wg = w.detach().requires_grad_()

    def dw():
        out = vlmkern.ops.patch_embed(x, wg, None, pos_embed=pos, cls_token=cls)
        return torch.autograd.grad(out, wg, torch.ones_like(out))[0]

    eager = dw()
    assert torch.equal(graph_replay(dw), eager)


def test_bad_env_value(monkeypatch):
    monkeypatch.setenv("VLMKERN_PATCH_EMBED_GEMM", "cudnn")
    x = torch.randn(1, 3, 14, 14, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8, 3, 14, 14, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="VLMKERN_PATCH_EMBED_GEMM must be 'lt' or 'implicit'"):
        vlmkern.ops.patch_embed(x, w)


# ---- packed Qwen3-VL: one GEMM with the bilinear positions + bias in its epilogue -------------

def _qwen3(grid, c, t, p, d, dtype, side=6, seed=3):
    """Packed Qwen3-VL-style inputs on the CPU: the rows of every image of grid (t, h, w), weight
    (D, C, T, P, P), bias, a (side², D) position table."""
    g = torch.Generator().manual_seed(seed)
    n = sum(a * b * e for a, b, e in grid)
    x = torch.randn(n, c * t * p * p, generator=g).to(dtype)
    w = (torch.randn(d, c, t, p, p, generator=g) * (c * t * p * p) ** -0.5).to(dtype)
    b, pos = torch.randn(d, generator=g).to(dtype), torch.randn(side * side, d, generator=g)
    return x, w, b, pos.to(dtype), torch.tensor(grid)


def _packed_tokens(mode, monkeypatch, x, w, b, pos, grid):
    monkeypatch.setenv("VLMKERN_PATCH_EMBED_GEMM", mode)
    return vlmkern.ops.patch_embed(x, w, b, pos_embed=pos, grid_thw=grid, spatial_merge_size=2)[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", [
    # Qwen3-VL's real patch (K = 1536 = 24 k tiles) and width, 2020 rows: a partial row tile
    ((3, 2, 16), 1152, 48, [[1, 32, 32], [2, 18, 26], [1, 6, 10]]),
    ((3, 2, 4), 200, 6, [[1, 4, 6], [2, 8, 4], [1, 2, 2]]),   # K = 96: a half k tile; D tail
    ((3, 2, 4), 33, 6, [[1, 4, 6], [1, 2, 2]]),                # odd D: single-element stores
], ids=["qwen3vl", "tails", "odd_d"])
def test_implicit_packed_positions(case, bias, dtype, monkeypatch):
    """VLMKERN_PATCH_EMBED_GEMM=implicit on packed Qwen3-VL rows: the positions + bias are
    computed in shuffle_gemm_kernel's epilogue (no position_rows_kernel, no (N, D) addend, no
    cuBLAS), within 2x the default path's error against float64 and within a rounding of it."""
    (c, t, p), d, side, grid = case
    x, w, b, pos, grid = _qwen3(grid, c, t, p, d, dtype, side)
    b = b if bias else None
    dev = [v.cuda() if v is not None else None for v in (x, w, b, pos, grid)]
    ours = _packed_tokens("implicit", monkeypatch, *dev)
    names = profiled_names(lambda: _packed_tokens("implicit", monkeypatch, *dev))
    assert any("shuffle_gemm_kernel" in n for n in names), "the position GEMM did not run"
    assert not any("position_rows_kernel" in n for n in names), "an (N, D) addend was written"
    base = _packed_tokens("lt", monkeypatch, *dev)
    ref = _packed_tokens("lt", monkeypatch, x.double(), w.double(),
                         None if b is None else b.double(), pos.double(), grid)
    assert ours.shape == ref.shape and ours.dtype == dtype
    err = (ours.cpu().double() - ref).abs().max().item()
    base_err = (base.cpu().double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 2 * base_err + 1e-3 * scale, (err, base_err, scale)
    # same function as the position-rows addend + cuBLASLt: they differ only in the GEMM's order
    torch.testing.assert_close(ours.float(), base.float(), rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("why, dtype, shape", [
    ("fp32 (no fp32 variant)", torch.float32, (3, 2, 4)),
    ("K = 27, not a multiple of 8", torch.bfloat16, (3, 1, 3)),
])
def test_implicit_packed_positions_fallback(why, dtype, shape, monkeypatch):
    """Inputs the position GEMM does not take run the position-rows kernel + GEMM instead,
    giving exactly the default path's tokens."""
    x, w, b, pos, grid = _qwen3([[1, 4, 6], [1, 2, 2]], *shape, 32, dtype)
    dev = [v.cuda() for v in (x, w, b, pos, grid)]
    names = profiled_names(lambda: _packed_tokens("implicit", monkeypatch, *dev))
    assert not any("shuffle_gemm_kernel" in n for n in names), why
    assert any("position_rows_kernel" in n for n in names), why
    assert torch.equal(_packed_tokens("implicit", monkeypatch, *dev),
                       _packed_tokens("lt", monkeypatch, *dev))


def test_implicit_packed_positions_graph_and_repeats(monkeypatch):
    """G8 / G11: the position GEMM is bit-identical over 20 calls and inside a CUDA graph (the
    taps come from grid_thw on the device: no host read)."""
    x, w, b, pos, grid = _qwen3([[1, 16, 20], [2, 6, 8]], 3, 2, 16, 384, torch.bfloat16, 48)
    dev = [v.cuda() for v in (x, w, b, pos, grid)]

    def step():
        return _packed_tokens("implicit", monkeypatch, *dev)

    first = step()
    for _ in range(20):
        assert torch.equal(step(), first)
    assert torch.equal(graph_replay(step), first)
