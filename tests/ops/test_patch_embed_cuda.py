"""patch_embed on CUDA (all `gpu`-marked, skipped without a GPU): CUDA vs CPU forward and backward
for the image, packed and varlen ops, the packed op inside CUDA-graph capture (no host sync), a
non-default stream, and bit-identical repeats (G8, G11)."""

import pytest
import torch

import vlmkern

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "cropped-view", "uint8", "uint8-nhwc"])
@pytest.mark.parametrize("patch", [7, 14, 16])  # K = 147, 588 (zero-padded to 152, 592), 768
def test_cuda_patch_matrix_kernel(patch, layout, dtype):
    """Image mode's patch matrix comes from the patchify kernel on CUDA (dtype conversion, any
    strides, K padded to 16-byte rows): forward and dW equal the CPU path's within the tier."""
    g = torch.Generator().manual_seed(patch)
    b, d, grid = 2, 40, 3
    size = grid * patch
    w = (torch.randn(d, 3, patch, patch, generator=g) * 0.05).to(dtype)
    pos = torch.randn(grid * grid, d, generator=g).to(dtype)
    norm = {}
    if layout.startswith("uint8"):
        x = torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)
        norm = {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28], "rescale": 1 / 255}
    elif layout == "cropped-view":  # offset, strided, cropped on the fly
        x = torch.randn(b + 1, 4, size + 5, size + 3, generator=g).to(dtype)[1:, 1:, 2:, :]
    else:
        x = torch.randn(b, 3, size, size, generator=g).to(dtype)
    channels_last = layout.endswith("nhwc")
    if channels_last:
        x = x.permute(0, 2, 3, 1).contiguous()
    outs = {}
    for dev in ("cpu", "cuda"):
        wd = w.to(dev).requires_grad_()
        out = vlmkern.ops.patch_embed(x.to(dev), wd, None, pos_embed=pos.to(dev),
                                      channels_last=channels_last, crop=True, **norm)
        (dw,) = torch.autograd.grad(out, [wd], torch.ones_like(out))
        outs[dev] = (out.detach(), dw)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    for a, c in zip(outs["cuda"], outs["cpu"], strict=True):
        assert a.device.type == "cuda" and a.is_contiguous()
        torch.testing.assert_close(a.cpu().float(), c.float(), **tol)
