"""vlmkern.ops.vision_grid: equality with transformers' vision_utils helpers (random packed
images and videos, merge 1-3, windows, both corner rules), the fixed-length cu_seqlens'
padding, packed attention over padded boundaries, no host sync under torch.compile and CUDA-graph
capture (CUDA tests auto-skipped without a GPU), bad inputs."""

import random

import pytest
import torch
from testing_utils import compile_recording, graph_replay, no_host_sync, sync_points

from vlmkern.ops import cross_attention, vision_grid

vu = pytest.importorskip("transformers.vision_utils")


def _grid(rng: random.Random, merge: int, device: str = "cpu") -> torch.Tensor:
    """1-4 images or videos, h and w multiples of the merge size."""
    rows = [[rng.choice([1, 1, 2, 3]), merge * rng.randint(1, 9), merge * rng.randint(1, 9)]
            for _ in range(rng.randint(1, 4))]
    return torch.tensor(rows, device=device)


def _patches(grid: torch.Tensor) -> int:
    return int(grid.prod(-1).sum())


def _assert_padded(got: torch.Tensor, hf: torch.Tensor, total: int, length: int) -> None:
    """HF's boundaries, then ``total`` repeated up to the fixed length."""
    assert got.dtype == torch.int32 and got.shape == (length,)
    torch.testing.assert_close(got[: len(hf)].cpu(), hf.cpu(), rtol=0, atol=0)
    assert bool((got[len(hf):] == total).all())


@pytest.mark.parametrize("seed", range(40))
def test_matches_transformers(seed):
    rng = random.Random(seed)
    merge = rng.choice([1, 2, 2, 3])
    grid = _grid(rng, merge)
    n = _patches(grid)
    exact = vision_grid.vision_cu_seqlens(grid, n, exact=True)
    torch.testing.assert_close(exact, vu.get_vision_cu_seqlens(grid), rtol=0, atol=0)
    _assert_padded(vision_grid.vision_cu_seqlens(grid, n), exact, n, n + 1)
    torch.testing.assert_close(vision_grid.vision_position_ids(grid, n, merge),
                               vu.get_vision_position_ids(grid, merge), rtol=0, atol=0)

    patch = rng.choice([14, 16])
    window = rng.randint(patch * merge, patch * merge * 5)  # not only multiples
    hf_index, hf_cu = vu.get_vision_window_index(grid, merge, window, patch)
    index, cu = vision_grid.vision_window_index(grid, n, merge, window, patch)
    torch.testing.assert_close(index, hf_index, rtol=0, atol=0)
    _assert_padded(cu, hf_cu, n, n // merge**2 + 1)
    _, cu_exact = vision_grid.vision_window_index(grid, n, merge, window, patch, exact=True)
    torch.testing.assert_close(cu_exact, hf_cu, rtol=0, atol=0)

    for align_corners in (True, False):
        side = rng.randint(2, 48)
        hf = vu.get_vision_interpolation_indices_and_weights(grid, side, "bilinear",
                                                              align_corners, merge)
        got = vision_grid.vision_interp_taps(grid, n, merge, side, align_corners)
        for a, b in zip(got, hf, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_window_edges():
    """Grids that are and are not multiples of the window (HF pads a whole empty window row /
    column when they are), and a window of one merged token."""
    grid = torch.tensor([[1, 16, 16], [2, 12, 20], [1, 2, 2]])
    n = _patches(grid)
    for window in (28, 112, 224, 448):
        hf_index, hf_cu = vu.get_vision_window_index(grid, 2, window, 14)
        index, cu = vision_grid.vision_window_index(grid, n, 2, window, 14, exact=True)
        torch.testing.assert_close(index, hf_index, rtol=0, atol=0)
        torch.testing.assert_close(cu, hf_cu, rtol=0, atol=0)
    assert sorted(index.tolist()) == list(range(n // 4))


def test_padded_segments_attend_as_exact(device):
    """cross_attention over the fixed-length boundaries (empty trailing segments) equals the
    exact ones, forward and backward."""
    grid = torch.tensor([[1, 4, 6], [2, 2, 4], [1, 6, 2]], device=device)
    n = _patches(grid)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(n, 2, 64, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    outs, grads = [], []
    for exact in (True, False):
        cu = vision_grid.vision_cu_seqlens(grid, n, exact=exact)
        out = cross_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    assert outs[0].shape == (n, 2, 64)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _all(x: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    n = x.shape[0]
    return (vision_grid.vision_cu_seqlens(grid, n), vision_grid.vision_position_ids(grid, n, 2),
            *vision_grid.vision_window_index(grid, n, 2, 112, 14),
            *vision_grid.vision_interp_taps(grid, n, 2, 48))


def test_compiles_without_host_sync():
    """fullgraph, dynamic shapes: no item() / scalar reads in the graph; a second grid (other
    values, other patch count) reuses it and is still right."""
    compiled, graphs = compile_recording(_all, dynamic=True)
    for grid in (torch.tensor([[1, 8, 12], [2, 4, 4]]), torch.tensor([[1, 16, 6]]),
                 torch.tensor([[3, 2, 2], [1, 6, 8], [1, 4, 10]])):
        x = torch.randn(_patches(grid), 3)
        for a, b in zip(compiled(x, grid), _all(x, grid), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert graphs and all(not sync_points(g) for g in graphs)


def test_bad_inputs():
    grid = torch.tensor([[1, 4, 4]])
    with pytest.raises(ValueError, match="holds 16 patches, the input 20"):
        vision_grid.vision_position_ids(grid, 20, 2)
    with pytest.raises(ValueError, match=r"grid_thw must be \(images, 3\)"):
        vision_grid.vision_cu_seqlens(grid[0], 16)
    with pytest.raises(ValueError, match="under one merged token"):
        vision_grid.vision_window_index(grid, 16, 2, 14, 14)


@pytest.mark.gpu
def test_cuda_no_host_sync_and_graph_capture():
    grid = torch.tensor([[1, 8, 12], [2, 4, 4], [1, 2, 6]], device="cuda")
    x = torch.randn(_patches(grid), 3, device="cuda")
    expected = _all(x.cpu(), grid.cpu())
    with no_host_sync():
        eager = _all(x, grid)
    for a, b in zip(eager, expected, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0)
    # the same patch count, other images: the replay reads the new grid
    new_grid = torch.tensor([[1, 4, 4], [1, 10, 12], [1, 2, 2]], device="cuda")
    expected = _all(x.cpu(), new_grid.cpu())
    static = graph_replay(lambda: _all(x, grid), before_replay=lambda: grid.copy_(new_grid))
    for a, b in zip(static, expected, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0)


def test_sync_check_sees_transformers_loops():
    """The check above can fail: transformers' helper (a loop over grid_thw.tolist()) shows its
    host reads in the same kind of graph."""
    compiled, graphs = compile_recording(vu.get_vision_position_ids)
    compiled(torch.tensor([[1, 8, 12], [2, 4, 4]]), 2)
    assert any(sync_points(g) for g in graphs)
