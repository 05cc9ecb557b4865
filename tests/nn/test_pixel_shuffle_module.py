"""Tests for vlmkern.nn.PixelShuffle: same result as the functional op, no state, readable repr."""

import pytest
import torch

import vlmkern
from vlmkern.nn import PixelShuffle


def test_matches_functional_4d(device):
    x = torch.randn(2, 8, 4, 6, device=device).transpose(1, 2)  # (B, H=4, W=8, C) transposed
    out = PixelShuffle(2)(x)
    expected = vlmkern.ops.pixel_shuffle(x, 2)
    assert expected.norm() > 0
    assert out.shape == (2, 2, 4, 24)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(("grid", "scale"), [((4, 6), 2), ((6, 9), 3), ((8, 8), 4)])
def test_matches_functional_with_grid(grid, scale, device):
    feats = torch.randn(3, 1 + grid[0] * grid[1], 5, dtype=torch.bfloat16, device=device)
    module = PixelShuffle(scale, grid=grid)
    out = module(feats[:, 1:])
    expected = vlmkern.ops.pixel_shuffle(feats[:, 1:], scale, grid=grid)
    assert expected.float().norm() > 0
    assert out.shape == (3, grid[0] * grid[1] // scale**2, scale * scale * 5)
    assert torch.equal(out, expected)


def test_backward_matches_functional():
    base = torch.randn(2, 1 + 16, 3, dtype=torch.float64)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    weight = torch.randn(2, 4, 12, dtype=torch.float64)
    (PixelShuffle(2, grid=(4, 4))(a[:, 1:]) * weight).sum().backward()
    (vlmkern.ops.pixel_shuffle(b[:, 1:], 2, grid=(4, 4)) * weight).sum().backward()
    assert a.grad.norm() > 0
    assert torch.equal(a.grad, b.grad)
    assert torch.equal(a.grad[:, 0], torch.zeros_like(a.grad[:, 0]))  # CLS gets no gradient


def test_has_no_parameters_or_buffers():
    module = PixelShuffle(2, grid=(32, 32))
    assert list(module.parameters()) == []
    assert list(module.buffers()) == []
    assert module.state_dict() == {}


def test_repr_shows_scale_and_grid():
    assert "scale=4" in repr(PixelShuffle(4))
    assert "grid" not in repr(PixelShuffle(4))
    text = repr(PixelShuffle(2, grid=(32, 32)))
    assert "scale=2" in text and "grid=(32, 32)" in text
