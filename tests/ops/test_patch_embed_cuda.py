"""patch_embed on CUDA (all `gpu`-marked, skipped without a GPU): CUDA vs CPU forward and backward
for the image, packed and varlen ops, the packed and image ops inside CUDA-graph capture (no host
sync), a non-default stream, bit-identical repeats, torch.compile with inductor (G8, G11), and no
unwritten output under deterministic mode (G7)."""

import contextlib
from functools import partial

import pytest
import torch
from patch_embed_testing import assert_compiled_matches_eager
from testing_utils import assert_nontrivial, deterministic_mode, graph_replay, profiled_names
from torch._dynamo.testing import CompileCounterWithBackend

import vlmkern
from vlmkern import reference

pytestmark = pytest.mark.gpu


def _image(dev, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 35, 21, generator=g).to(dtype)
    w = (torch.randn(24, 3, 7, 7, generator=g) * 0.1).to(dtype)
    b, c = torch.randn(24, generator=g).to(dtype), torch.randn(24, generator=g).to(dtype)
    pos = torch.randn(17, 24, generator=g).to(dtype)  # CLS + 4x4, resized to 5x3
    return [t.to(dev).requires_grad_() for t in (x, w, b, pos, c)]


def _packed(dev, dtype):
    g = torch.Generator().manual_seed(1)
    grid = torch.tensor([[1, 4, 6], [2, 8, 4], [1, 2, 2]])
    x = torch.randn(92, 3 * 2 * 4 * 4, generator=g).to(dtype)
    w = (torch.randn(32, 3, 2, 4, 4, generator=g) * 0.1).to(dtype)
    b, pos = torch.randn(32, generator=g).to(dtype), torch.randn(36, 32, generator=g).to(dtype)
    return [t.to(dev).requires_grad_() for t in (x, w, b, pos)], grid.to(dev)


def _grads(out, leaves):
    g = torch.ones_like(out)
    return torch.autograd.grad(out, leaves, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    outs = {}
    for dev in ("cpu", "cuda"):
        x, w, b, pos, c = _image(dev, dtype)
        img = vlmkern.ops.patch_embed(x, w, b, pos_embed=pos, cls_token=c)
        (px, pw, pb, ppos), grid = _packed(dev, dtype)
        tok, cu = vlmkern.ops.patch_embed(px, pw, pb, pos_embed=ppos, grid_thw=grid,
                                          spatial_merge_size=2)
        var, vcu = vlmkern.ops.patch_embed([x[0], x[1, :, :28, :14]], w, b, pos_embed=pos,
                                           cls_token=c)
        outs[dev] = (img, tok, cu, var, vcu, *_grads(img, [x, w, b, pos, c]),
                     *_grads(tok, [px, pw, pb, ppos]))
    for a, b in zip(outs["cuda"], outs["cpu"], strict=True):
        assert a.device.type == "cuda"
        torch.testing.assert_close(a.cpu(), b, **tol)


def test_cuda_packed_graph_capture_and_stream():
    (x, w, b, pos), grid = _packed("cuda", torch.bfloat16)
    x, w, b, pos = (t.detach() for t in (x, w, b, pos))

    def step():
        return vlmkern.ops.patch_embed(x, w, b, pos_embed=pos, grid_thw=grid,
                                       spatial_merge_size=2)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_tok, static_cu = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_tok, eager[0]) and torch.equal(static_cu, eager[1])


def test_cuda_repeats_are_bit_identical():
    x, w, b, pos, c = (t.detach() for t in _image("cuda", torch.bfloat16))
    first = vlmkern.ops.patch_embed(x, w, b, pos_embed=pos, cls_token=c)
    for _ in range(20):
        assert torch.equal(vlmkern.ops.patch_embed(x, w, b, pos_embed=pos, cls_token=c), first)


LAYOUTS = ["nchw", "nhwc", "cropped-view", "nhwc-view", "nchw-cl-memory", "uint8", "uint8-nhwc"]


def _pixels(layout, b, size, dtype, g):
    """(base tensor on the CPU, view to take of it on each device, channels_last flag)."""
    if layout.startswith("uint8"):
        base = torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)
    else:
        base = torch.randn(b + 1, 4, size + 5, size + 3, generator=g).to(dtype)
    views = {  # offsets, gaps and crops are taken on the device, so the kernel sees them
        "nchw": lambda t: t[1:, 1:, :size, :size].contiguous(),
        "nhwc": lambda t: t[1:, 1:, :size, :size].permute(0, 2, 3, 1).contiguous(),
        "cropped-view": lambda t: t[1:, 1:, 2:, :],  # storage offset, row gaps, crop=True
        "nhwc-view": lambda t: t.permute(0, 2, 3, 1)[1:, 2:, 1:, 1:],  # strided (B, H, W, C)
        "nchw-cl-memory": lambda t: t[1:, 1:, :size, :size].contiguous(
            memory_format=torch.channels_last),
        "uint8": lambda t: t,
        "uint8-nhwc": lambda t: t.permute(0, 2, 3, 1).contiguous(),
    }
    return base, views[layout], layout in ("nhwc", "nhwc-view", "uint8-nhwc")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("patch", [7, 14, 16])  # K = 147, 588 (zero-padded to 152, 592), 768
def test_cuda_patch_matrix_kernel(patch, layout, dtype):
    """Image mode's patch matrix comes from the patchify kernel on CUDA (dtype conversion, any
    strides, K padded to 16-byte rows): forward, dW and d_pixels equal the CPU path's within the
    tier, and the profiler shows the kernel ran (the ATen fallback would pass the comparison)."""
    g = torch.Generator().manual_seed(patch)
    b, d, gh, gw = 2, 40, 3, 2  # a non-square grid: gh / gw mix-ups show
    size = max(gh, gw) * patch
    base, view, channels_last = _pixels(layout, b, size, dtype, g)
    w = (torch.randn(d, 3, patch, patch, generator=g) * 0.05).to(dtype)
    pos = torch.randn(gh * gw, d, generator=g).to(dtype)
    norm = {}
    if layout.startswith("uint8"):
        norm = {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28], "rescale": 1 / 255}
    float_px = not layout.startswith("uint8")
    outs = {}
    for dev in ("cpu", "cuda"):
        x = view(base.to(dev))
        hdim = 1 if channels_last else 2  # non-square grid: H cropped to gh * P, W to gw * P
        x = x.narrow(hdim, 0, gh * patch).narrow(hdim + 1, 0, gw * patch)
        if float_px:
            x.requires_grad_()
        wd = w.to(dev).requires_grad_()

        def run(x=x, wd=wd, dev=dev):
            return vlmkern.ops.patch_embed(x, wd, None, pos_embed=pos.to(dev), pos_interp="none",
                                           channels_last=channels_last, crop=True, **norm)

        out = run()
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(dev)
        leaves = [wd, x] if float_px else [wd]
        outs[dev] = (out.detach(), *torch.autograd.grad(out, leaves, go))
        if dev == "cuda":
            assert any("patchify_kernel" in n for n in profiled_names(run)), "kernel did not run"
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    for a, c in zip(outs["cuda"], outs["cpu"], strict=True):
        assert a.device.type == "cuda"
        torch.testing.assert_close(a.cpu().float(), c.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [True, False])
def test_cuda_addend_in_the_gemm_epilogue(dtype, cls):
    """With positions (and CLS rows skipped in the output), bias + positions are the C operand of
    one cuBLASLt batched GEMM (batch stride 0), not a baddbmm after a broadcast copy; the result
    equals the CPU path's. Without cuBLASLt in the build, baddbmm stays and only equality counts."""
    g = torch.Generator().manual_seed(7)
    b, d, grid, p = 3, 48, 4, 8
    x = torch.randn(b, 3, grid * p, grid * p, generator=g).to(dtype)
    w = (torch.randn(d, 3, p, p, generator=g) * 0.05).to(dtype)
    bias = torch.randn(d, generator=g).to(dtype)
    pos = torch.randn(grid * grid + int(cls), d, generator=g).to(dtype)
    c = torch.randn(d, generator=g).to(dtype) if cls else None
    outs = {}
    for dev in ("cpu", "cuda"):
        args = [None if t is None else t.to(dev) for t in (x, w, bias, pos, c)]

        def run(args=args):
            return vlmkern.ops.patch_embed(args[0], args[1], args[2], pos_embed=args[3],
                                           cls_token=args[4], pos_interp="none")

        outs[dev] = run()
        if dev == "cuda":
            names = profiled_names(run)
            if vlmkern.info()["cublaslt"]:
                assert "aten::baddbmm" not in names and "aten::bmm" not in names
            else:
                assert "aten::baddbmm" in names
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(outs["cuda"].cpu().float(), outs["cpu"].float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_packed_positions_kernel(dtype, bias):
    """Packed mode with Qwen3-VL's bilinear table: the position + bias addend comes from
    position_rows_kernel (not the ATen gathers and their fp32 sum) and, with cuBLASLt linked,
    rides in the GEMM epilogue (no separate add); the tokens equal the CPU path's."""
    (px, pw, pb, ppos), grid = _packed("cpu", dtype)
    outs = {}
    for dev in ("cpu", "cuda"):
        args = [t.detach().to(dev) for t in (px, pw, pb, ppos)]

        def run(args=args, dev=dev):
            return vlmkern.ops.patch_embed(args[0], args[1], args[2] if bias else None,
                                           pos_embed=args[3], grid_thw=grid.to(dev),
                                           spatial_merge_size=2)[0]

        outs[dev] = run()
        if dev == "cuda":
            names = profiled_names(run)
            assert any("position_rows_kernel" in n for n in names), "kernel did not run"
            assert not names & {"aten::addcmul_", "aten::mul_"}  # the ATen gathers' sum
            if vlmkern.info()["cublaslt"]:
                assert not names & {"aten::addmm", "aten::add_", "aten::baddbmm"}
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(outs["cuda"].cpu().float(), outs["cpu"].float(), **tol)


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_past_int32_indexing(channels_last):
    """G9: a 26880² uint8 image (2.17e9 pixels) whose patch matrix at P = 14 has 3.7e6 rows x 592
    (2.18e9 elements): pixel offsets and patch-matrix offsets pass 2**31. The first and the last
    64 tokens are checked against the float64 reference run on just their strips of pixels
    (no positions, so a strip's tokens are the full image's)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs >= 40 GB of GPU memory")
    side, p, d = 26880, 14, 32
    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    shape = (1, side, side, 3) if channels_last else (1, 3, side, side)
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
    assert pixels.numel() > 2**31
    w = (torch.randn(d, 3, p, p, device="cuda") * 0.05).to(torch.bfloat16)
    b = torch.randn(d, device="cuda").to(torch.bfloat16)
    kw = {"mean": mean, "std": std, "rescale": 1 / 255, "channels_last": channels_last}
    tokens = vlmkern.ops.patch_embed(pixels, w, b, **kw)  # (1, 1920², 32)
    n = (side // p) ** 2
    assert tokens.shape == (1, n, d) and not tokens.isnan().any()
    for rows, cols, sl in ((slice(0, p), slice(0, 64 * p), slice(0, 64)),
                           (slice(side - p, side), slice(side - 64 * p, side), slice(n - 64, n))):
        strip = pixels[:, rows, cols] if channels_last else pixels[:, :, rows, cols]
        ref = vlmkern.reference.patch_embed(strip.cpu(), w.double().cpu(), b.double().cpu(),
                                            **kw)  # fmt: skip
        assert ref.abs().max() > 0
        torch.testing.assert_close(tokens[:, sl].double().cpu(), ref, rtol=2e-2,
                                   atol=2e-2 * ref.abs().max().item())  # fmt: skip


# ---- CUDA graphs, torch.compile with inductor, unwritten outputs (G7, G11) ----------------------

NORM = {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28], "rescale": 1 / 255}


def _uint8_nhwc(seed=2):
    """(3, 35, 21, 3) uint8 pixels: _image's 5x3 grid of 7x7 patches, channels last."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 35, 21, 3), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("case", ["clip", "uint8-nhwc"])
def test_cuda_image_graph_capture(case):
    """G11: image mode on its default CUDA path (patchify kernel + cuBLASLt GEMM) with bias, CLS
    and a 4x4 table bicubic-resized to the 5x3 grid; bf16 NCHW pixels (CLIP) or uint8 NHWC ones
    normalized in the op. Captured in a CUDA graph (a host sync fails the capture), the pixels
    rewritten in place, replayed: the bits of an eager call on the new pixels."""
    x, w, b, pos, c = (t.detach() for t in _image("cuda", torch.bfloat16))
    kw = {"pos_embed": pos, "cls_token": c}
    if case == "uint8-nhwc":
        x, kw = _uint8_nhwc().cuda(), {**kw, **NORM, "channels_last": True}
        new = _uint8_nhwc(seed=3).cuda()
    else:
        new = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x)

    def step():
        return vlmkern.ops.patch_embed(x, w, b, **kw)

    assert any("patchify_kernel" in n for n in profiled_names(step)), "kernel did not run"
    before = step()
    static = graph_replay(step, before_replay=lambda: x.copy_(new))
    eager = step()
    assert eager.shape == (3, 16, 24) and not torch.equal(eager, before)  # new pixels count
    assert torch.equal(static, eager)


def _stem(pixels, w, b, pos, cls, patches, w3, b3, pos3, grid):
    """Image mode (CLS, bias, resized positions) and packed mode (Qwen3-VL's bilinear table,
    merge 2) in one compiled region, with ATen ops around them for inductor to fuse."""
    a = vlmkern.ops.patch_embed(pixels, w, b, pos_embed=pos, cls_token=cls)
    t, cu = vlmkern.ops.patch_embed(patches, w3, b3, pos_embed=pos3, grid_thw=grid,
                                    spatial_merge_size=2)
    return a * 2, t, cu


def test_cuda_torch_compile_inductor():
    """G11: torch.compile(fullgraph=True, backend="inductor") of image + packed mode on CUDA:
    no graph break, forward and backward equal eager's within fp32 tolerances, at most 2
    compilations over 4 batch sizes (B = 1 specializes, B = 2 turns dynamic)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(_stem, backend=counter, fullgraph=True)
    _, w, b, pos, c = _image("cuda", torch.float32)
    (_, w3, b3, pos3), _ = _packed("cuda", torch.float32)
    g = torch.Generator().manual_seed(5)
    try:
        for batch in (1, 2, 3, 4):
            pixels = torch.randn(batch, 3, 35, 21, generator=g).cuda().requires_grad_()
            patches = torch.randn(16 * batch, 96, generator=g).cuda().requires_grad_()
            grid = torch.tensor([[1, 4, 4]] * batch, device="cuda")
            args = (pixels, w, b, pos, c, patches, w3, b3, pos3, grid)
            eager = assert_compiled_matches_eager(
                _stem, compiled, args, [pixels, w, b, pos, c, patches, w3, b3, pos3])
            assert eager[0].shape == (batch, 16, 24) and eager[1].shape == (16 * batch, 32)
        assert 1 <= counter.frame_count <= 2
        targets = {str(n.target) for gm in counter.graphs for n in gm.graph.nodes}
        assert {"vlmkern.patch_embed", "vlmkern.patch_embed_packed"} <= targets
    finally:
        torch._dynamo.reset()


def _image_call(pe, x, w, b, pos, c, **kw):
    return pe(x, w, b, pos_embed=pos, cls_token=c, **kw)


def _packed_call(pe, x, w, b, pos, grid):
    return pe(x, w, b, pos_embed=pos, grid_thw=grid, spatial_merge_size=2)[0]


def _varlen_call(pe, x0, x1, w, b, c, *pos):
    """The varlen op's tokens; the reference has no list form: its per-image tokens, packed."""
    p = pos[0] if pos else None
    if pe is vlmkern.ops.patch_embed:
        return pe([x0, x1], w, b, pos_embed=p, cls_token=c)[0]
    return torch.cat([pe(x[None], w, b, pos_embed=p, cls_token=c)[0] for x in (x0, x1)])


def _assert_all_written(call, leaves, backward, what):
    """G7: call(patch_embed, *leaves) on CUDA under deterministic mode (fresh buffers NaN-filled)
    and, with `backward`, the gradients of its float leaves; the same in float64 on the CPU with
    the reference. No output or gradient element is NaN where the reference's is not."""
    results = {}
    for dev, pe in (("cuda", vlmkern.ops.patch_embed), ("cpu", reference.patch_embed)):
        args = [t.detach().to(dev) for t in leaves]
        if dev == "cpu":
            args = [t.double() if t.is_floating_point() else t for t in args]
        diff = [t.requires_grad_() for t in args if t.is_floating_point()] if backward else []
        with deterministic_mode() if dev == "cuda" else contextlib.nullcontext():
            if dev == "cuda":
                assert torch.empty(4, device=dev).isnan().all(), "buffers are not NaN-filled"
            out = call(pe, *args)
            cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out)
            results[dev] = (out, *(torch.autograd.grad(out, diff, cot) if diff else ()))
    for i, (got, want) in enumerate(zip(results["cuda"], results["cpu"], strict=True)):
        assert got.shape == want.shape, (what, i)
        assert_nontrivial(want)
        assert not (got.cpu().isnan() & ~want.isnan()).any(), f"{what}: NaN in result {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_every_output_element_is_written(dtype):
    """G7 for image (float NCHW and uint8 NHWC), packed and varlen mode, forward and backward.
    Resized positions run forward only: CUDA's bicubic backward uses atomics and raises under
    deterministic mode (allowed by G8); the backward cases take tables at the grid's size."""
    x, w, b, pos, c = (t.detach() for t in _image("cpu", dtype))
    (px, pw, pb, ppos), grid = _packed("cpu", dtype)
    native = pos[:16]  # CLS + 5x3 rows: no resize
    x1 = x[1, :, :28, :14]  # a 4x2 grid, strided
    cases = {  # id: (call, leaves, backward)
        "image-resized": (_image_call, [x, w, b, pos, c], False),
        "image": (partial(_image_call, pos_interp="none"), [x, w, b, native, c], True),
        "uint8-nhwc": (partial(_image_call, pos_interp="none", channels_last=True, **NORM),
                       [_uint8_nhwc(), w, b, native, c], True),
        "packed": (_packed_call, [px, pw, pb, ppos, grid], True),
        "varlen-resized": (_varlen_call, [x[0], x1, w, b, c, pos], False),
        "varlen": (_varlen_call, [x[0], x1, w, b, c], True),
    }
    for what, (call, leaves, backward) in cases.items():
        _assert_all_written(call, leaves, backward, what)
