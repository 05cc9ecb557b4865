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
