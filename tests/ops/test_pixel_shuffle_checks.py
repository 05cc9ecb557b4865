"""pixel_shuffle / pixel_unshuffle autograd (backward = the inverse permutation, gradcheck),
opcheck, torch.compile, unwritten-output detection (G7), and bad inputs on real, meta and fake
tensors. Forward equality lives in test_pixel_shuffle.py."""

import re
import subprocess
import sys

import pytest
import torch
from testing_utils import (
    FLOATS,
    LAYOUTS,
    assert_bit_equal,
    assert_nontrivial,
    deterministic_mode,
    make_input,
)
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import vlmkern
from vlmkern import reference

shuffle_op = torch.ops.vlmkern.pixel_shuffle
unshuffle_op = torch.ops.vlmkern.pixel_unshuffle


def unshuffled_shape(shape, r):
    B, H, W, C = shape
    return (B, H // r, W // r, r * r * C)


# --- autograd, opcheck, compile -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_backward_is_the_inverse_permutation(dtype, device):
    x = make_input((2, 6, 4, 3), dtype, "transposed", device).detach().requires_grad_()
    out = shuffle_op(x, 2)
    g = make_input(tuple(out.shape), dtype, "channel_strided", device)
    (gx,) = torch.autograd.grad(out, x, g)
    assert_nontrivial(gx)
    assert_bit_equal(gx, reference.pixel_unshuffle(g.cpu().contiguous(), 2))
    y = make_input((2, 3, 2, 12), dtype, "offset", device).detach().requires_grad_()
    out = unshuffle_op(y, 2)
    g = make_input(tuple(out.shape), dtype, "sliced", device)
    (gy,) = torch.autograd.grad(out, y, g)
    assert_bit_equal(gy, reference.pixel_shuffle(g.cpu().contiguous(), 2))


GRAD_CASES = {
    "shuffle": ((2, 4, 6, 3), lambda t: shuffle_op(t, 2)),
    "shuffle-r3": ((1, 3, 6, 2), lambda t: shuffle_op(t, 3)),
    "unshuffle": ((2, 2, 3, 12), lambda t: unshuffle_op(t, 2)),
    "wrapper-grid-cls-dropped": (
        (2, 1 + 4 * 6, 3),
        lambda t: vlmkern.ops.pixel_shuffle(t[:, 1:], 2, grid=(4, 6)),
    ),
    "wrapper-unshuffle-grid-strided": (
        (2, 7, 2 * 12),
        lambda t: vlmkern.ops.pixel_unshuffle(t[:, 1:, ::2], 2, grid=(4, 6)),
    ),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck(case):
    shape, fn = GRAD_CASES[case]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


# (pixel_shuffle input shape, r, layout, requires_grad); unshuffle gets the matching output shape.
OPCHECK_SAMPLES = [
    ((2, 4, 6, 3), 2, "contiguous", False),
    ((2, 4, 6, 3), 2, "contiguous", True),
    ((0, 4, 4, 2), 2, "contiguous", False),
    ((0, 4, 4, 2), 2, "contiguous", True),
    ((2, 6, 6, 2), 3, "transposed", True),
    ((1, 4, 8, 5), 4, "channel_strided", True),
    ((3, 4, 2, 3), 1, "offset", False),
]


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=str)
@pytest.mark.parametrize("inverse", [False, True], ids=["shuffle", "unshuffle"])
def test_opcheck(inverse, sample):
    shape, r, layout, requires_grad = sample
    op = unshuffle_op if inverse else shuffle_op
    x = make_input(unshuffled_shape(shape, r) if inverse else shape, torch.float32, layout)
    x = x.detach().requires_grad_(requires_grad)
    torch.library.opcheck(op.default, (x, r))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _connector(feats):
    """A CLS-dropping connector using the grid path, the 4-D path and the inverse."""
    x = feats[:, 1:]
    a = vlmkern.ops.pixel_shuffle(x, 2, grid=(4, 6))
    b = vlmkern.ops.pixel_shuffle(x.unflatten(1, (4, 6)), 2)
    c = vlmkern.ops.pixel_unshuffle(a, 2, grid=(4, 6))
    return a * 2, b, c


@pytest.mark.parametrize(
    ("dev", "backend"),
    [("cpu", "aot_eager"), pytest.param("cuda", "inductor", marks=pytest.mark.gpu)],
)
def test_torch_compile(dev, backend, fresh_dynamo):
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(_connector, backend=counter, fullgraph=True)
    for B in (1, 2, 3, 4):
        base = torch.randn(B, 1 + 4 * 6, 3, device=dev)
        feats_e, feats_c = base.clone().requires_grad_(), base.clone().requires_grad_()
        outs_e, outs_c = _connector(feats_e), compiled(feats_c)
        weights = [torch.randn_like(o) for o in outs_e]
        for e, c in zip(outs_e, outs_c, strict=True):
            assert_bit_equal(c.detach(), e.detach())
        sum((o * w).sum() for o, w in zip(outs_e, weights, strict=True)).backward()
        sum((o * w).sum() for o, w in zip(outs_c, weights, strict=True)).backward()
        assert_nontrivial(feats_e.grad)
        torch.testing.assert_close(feats_c.grad, feats_e.grad)
    assert 1 <= counter.frame_count <= 2
    targets = {str(n.target) for g in counter.graphs for n in g.graph.nodes}
    assert {"vlmkern.pixel_shuffle", "vlmkern.pixel_unshuffle"} <= targets


@pytest.mark.parametrize("dtype", [*FLOATS, torch.int32])
def test_every_output_element_is_written(dtype, device):
    with deterministic_mode():
        assert torch.utils.deterministic.fill_uninitialized_memory
        assert torch.empty(4, device=device).isnan().all()  # fresh buffers are poisoned
        for layout in LAYOUTS:
            x = make_input((2, 8, 12, 8), dtype, layout, device)
            xc = x.cpu().contiguous()
            for out, expected in (
                (shuffle_op(x, 2), reference.pixel_shuffle(xc, 2)),
                (unshuffle_op(x, 2), reference.pixel_unshuffle(xc, 2)),
            ):
                if dtype.is_floating_point:
                    assert not out.isnan().any()
                assert_bit_equal(out, expected)


# --- bad inputs: real, meta and fake kernels and the wrappers raise the same errors -------------

ERROR_DEVICES = ["cpu", "meta", "fake", pytest.param("cuda", marks=pytest.mark.gpu)]

_PS, _PU = vlmkern.ops.pixel_shuffle, vlmkern.ops.pixel_unshuffle
_NDIV = "is not divisible by"
OP_ERRORS = {  # id: (op, input shape, scale, message)
    "x-3d": (shuffle_op, (2, 16, 3), 2, r"x must be a 4-D tensor"),
    "x-5d": (shuffle_op, (1, 2, 4, 4, 3), 2, r"x must be a 4-D tensor"),
    "y-3d": (unshuffle_op, (2, 4, 12), 2, r"y must be a 4-D tensor"),
    "y-5d": (unshuffle_op, (1, 1, 2, 2, 12), 2, r"y must be a 4-D tensor"),
    "x-scale-0": (shuffle_op, (1, 4, 4, 3), 0, r"scale must be >= 1, got 0"),
    "x-scale-neg": (shuffle_op, (1, 4, 4, 3), -2, r"scale must be >= 1, got -2"),
    "y-scale-0": (unshuffle_op, (1, 2, 2, 4), 0, r"scale must be >= 1, got 0"),
    "y-scale-neg": (unshuffle_op, (1, 2, 2, 4), -2, r"scale must be >= 1, got -2"),
    "x-height": (shuffle_op, (1, 5, 4, 3), 2, rf"x height H=5 {_NDIV} scale=2"),
    "x-width": (shuffle_op, (1, 4, 6, 3), 4, rf"x width W=6 {_NDIV} scale=4"),
    "y-channels": (unshuffle_op, (1, 2, 2, 6), 2, rf"y channels=6 {_NDIV} scale\*scale=4"),
}
WRAPPER_ERRORS = {  # id: (function, input shape, scale, grid, exception, message)
    "x-3d-no-grid": (_PS, (2, 16, 3), 2, None, ValueError, r"x is 3-D.*pass grid"),
    "y-3d-no-grid": (_PU, (2, 4, 12), 2, None, ValueError, r"y is 3-D.*pass grid"),
    "x-4d-with-grid": (_PS, (2, 4, 4, 3), 2, (4, 4), ValueError, r"grid=\(4, 4\), x must be 3-D"),
    "y-4d-with-grid": (_PU, (2, 2, 2, 12), 2, (4, 4), ValueError, r"grid=\(4, 4\), y must be 3-D"),
    "x-tokens": (_PS, (2, 15, 3), 2, (4, 4), ValueError, r"x has N=15 tokens.*needs 16"),
    "y-tokens": (_PU, (2, 5, 12), 2, (4, 4), ValueError, r"y has N=5 tokens.*needs 4"),
    "grid-len-1": (_PS, (2, 16, 3), 2, (16,), ValueError, r"grid must be two positive ints"),
    "grid-len-3": (_PS, (2, 16, 3), 2, (2, 2, 4), ValueError, r"grid must be two positive"),
    "grid-negative": (_PS, (2, 16, 3), 2, (-4, -4), ValueError, r"grid must be two positive"),
    "grid-zero": (_PU, (2, 0, 12), 2, (0, 4), ValueError, r"grid must be two positive"),
    "grid-ndiv": (_PU, (2, 4, 12), 2, (5, 4), ValueError, rf"grid \(5, 4\) {_NDIV} scale=2"),
    "y-grid-scale-0": (_PU, (2, 4, 12), 0, (4, 4), ValueError, r"scale must be an int >= 1"),
    "x-grid-scale-neg": (_PS, (2, 16, 3), -2, (4, 4), ValueError, r"scale must be an int >= 1"),
    "x-scale-0": (_PS, (2, 4, 4, 3), 0, None, ValueError, r"scale must be an int >= 1, got 0"),
    "y-scale-float": (_PU, (2, 2, 2, 12), 2.0, None, ValueError, r"scale must be an int"),
    "x-grid-height": (_PS, (2, 15, 3), 3, (5, 3), RuntimeError, rf"x height H=5 {_NDIV} scale=3"),
    "y-grid-channels": (_PU, (2, 4, 6), 2, (4, 4), RuntimeError, rf"y channels=6 {_NDIV}"),
}


def _zeros_on(shape, dev):
    """Zeros on `dev`; "fake" gives a FakeTensor (the torch.compile tracing path)."""
    if dev == "fake":
        return FakeTensorMode().from_tensor(torch.zeros(shape))
    return torch.zeros(shape, device=dev)


@pytest.mark.parametrize("dev", ERROR_DEVICES)
@pytest.mark.parametrize("case", OP_ERRORS)
def test_op_rejects_bad_input(case, dev):
    op, shape, scale, match = OP_ERRORS[case]
    x = _zeros_on(shape, dev)
    with pytest.raises(RuntimeError, match=match):
        op(x, scale)


@pytest.mark.parametrize("dev", ERROR_DEVICES)
@pytest.mark.parametrize("case", WRAPPER_ERRORS)
def test_wrapper_rejects_bad_input(case, dev):
    fn, shape, scale, grid, exc, match = WRAPPER_ERRORS[case]
    x = _zeros_on(shape, dev)
    with pytest.raises(exc, match=match):
        fn(x, scale, grid=grid)


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*:UserWarning")
@pytest.mark.parametrize(
    "fn", [shuffle_op, unshuffle_op, vlmkern.ops.pixel_shuffle], ids=["op", "inverse-op", "wrapper"]
)
def test_quantized_input_is_rejected(fn):
    q = torch.quantize_per_tensor(torch.randn(1, 4, 4, 4), 0.1, 0, torch.quint8)
    with pytest.raises(RuntimeError, match=r"(x|y) must not be quantized"):
        fn(q, 2)


@pytest.mark.parametrize("dev", ["cpu", "meta"])
@pytest.mark.parametrize("scale", [2**31, 2**32])
def test_overflowing_scale_is_rejected(scale, dev):
    """r·r·C must fit in int64 (H = W = 0 makes every divisibility check pass)."""
    x = torch.zeros(1, 0, 0, 3, device=dev)
    with pytest.raises(RuntimeError, match=r"scale"):
        shuffle_op(x, scale)


def test_unshuffle_overflowing_scale_does_not_crash():
    """scale·scale wraps to 0 in int64 for scale = 2**32; the check must not divide by it."""
    code = (
        "import torch, vlmkern\n"
        "try:\n"
        "    torch.ops.vlmkern.pixel_unshuffle(torch.zeros(1, 1, 1, 4), 2**32)\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-500:]}"
    assert re.search(r"raised: .*scale", proc.stdout), proc.stdout
