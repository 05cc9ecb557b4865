"""pixel_shuffle / pixel_unshuffle forward: bit-exact against the reference and the HF formulas
on every shape, dtype and layout, the grid-aware wrappers, fuzzing, and the CUDA-only checks
(auto-skipped without a GPU). Autograd, compile and bad inputs: test_pixel_shuffle_checks.py."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from testing_utils import (
    ALL_DTYPES,
    FLOATS,
    LAYOUTS,
    assert_bit_equal,
    assert_nontrivial,
    make_input,
    rand,
)
from torch.utils._python_dispatch import TorchDispatchMode

import vlmkern
from vlmkern import reference

shuffle_op = torch.ops.vlmkern.pixel_shuffle
unshuffle_op = torch.ops.vlmkern.pixel_unshuffle

SHAPES = [
    pytest.param((1, 2, 2, 1), 2, id="b1-c1"),
    pytest.param((0, 4, 4, 8), 2, id="empty-batch"),
    pytest.param((2, 0, 4, 3), 2, id="zero-height"),
    pytest.param((2, 4, 4, 0), 2, id="zero-channels"),
    pytest.param((2, 6, 6, 5), 1, id="r1"),
    pytest.param((2, 3, 3, 2), 3, id="r3-one-token"),
    pytest.param((2, 6, 9, 3), 3, id="r3-nonsquare-c3"),
    pytest.param((1, 8, 4, 113), 4, id="r4-nonsquare-c113"),
    pytest.param((3, 4, 10, 7), 2, id="nonsquare-c7"),
    pytest.param((1, 4, 2, 1023), 2, id="c1023"),
    pytest.param((1, 2, 4, 2047), 2, id="c2047"),
    pytest.param((2, 32, 32, 1024), 2, id="internvl"),
    pytest.param((1, 32, 32, 768), 4, id="smolvlm"),
    pytest.param((1, 26, 26, 1152), 2, id="idefics3"),
    pytest.param((1, 24, 24, 1408), 2, id="llama4"),
]


def shuffle_by_slices(x, r):
    """SEMANTICS.md literally: channel block dy·r + dx of Out is the phase X[:, dy::r, dx::r]."""
    return torch.cat([x[:, dy::r, dx::r] for dy in range(r) for dx in range(r)], dim=-1)


def internvl_pixel_shuffle(feats, scale_factor=0.5):
    """InternVL's InternVLModel.pixel_shuffle, restated: (n, w, h, c) -> (n, w/2, h/2, 4c)."""
    n, w, h, c = feats.shape
    s = scale_factor
    t = feats.view(n, w, int(h * s), int(c / s)).permute(0, 2, 1, 3).contiguous()
    t = t.view(n, int(h * s), int(w * s), int(c / (s * s)))
    return t.permute(0, 2, 1, 3).contiguous()


def idefics3_pixel_shuffle(seq_feats, scale_factor=2):
    """Idefics3/SmolVLM connector, restated: (bsz, seq, d), square grid -> (bsz, seq/s², d·s²)."""
    bsz, seq, d = seq_feats.shape
    side = int(seq**0.5)
    s = scale_factor
    t = seq_feats.view(bsz, side, side, d).view(bsz, side, side // s, d * s).permute(0, 2, 1, 3)
    t = t.reshape(bsz, side // s, side // s, d * s * s).permute(0, 2, 1, 3)
    return t.reshape(bsz, seq // (s * s), d * s * s)


def unshuffled_shape(shape, r):
    B, H, W, C = shape
    return (B, H // r, W // r, r * r * C)


# --- forward: bit-exact against the reference ------------------------------------------------


@pytest.mark.parametrize(("shape", "r"), SHAPES)
def test_reference_matches_definition(shape, r):
    x = make_input(shape, torch.float32, "contiguous")
    assert_bit_equal(reference.pixel_shuffle(x, r), shuffle_by_slices(x, r))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("shape", "r"), SHAPES)
def test_pixel_shuffle_matches_reference(shape, r, dtype, layout, device):
    x = make_input(shape, dtype, layout, device)
    out = shuffle_op(x, r)
    expected = reference.pixel_shuffle(x.cpu().contiguous(), r)
    assert_nontrivial(expected)
    assert out.device == x.device and out.is_contiguous()
    assert_bit_equal(out, expected)
    assert_bit_equal(unshuffle_op(out, r), x)  # round trip


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("shape", "r"), SHAPES)
def test_pixel_unshuffle_matches_reference(shape, r, dtype, layout, device):
    y = make_input(unshuffled_shape(shape, r), dtype, layout, device)
    out = unshuffle_op(y, r)
    expected = reference.pixel_unshuffle(y.cpu().contiguous(), r)
    assert_nontrivial(expected)
    assert out.shape == shape and out.device == y.device and out.is_contiguous()
    assert_bit_equal(out, expected)
    assert_bit_equal(shuffle_op(out, r), y)  # round trip


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
@pytest.mark.parametrize("layout", ["contiguous", "channel_strided", "transposed", "offset"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_element_size_is_bit_exact(dtype, layout, device):
    x = make_input((2, 6, 4, 5), dtype, layout, device, raw_bits=True)
    expected = reference.pixel_shuffle(x.cpu().contiguous(), 2)
    assert_nontrivial(expected)
    assert_bit_equal(expected, shuffle_by_slices(x.cpu(), 2))
    out = shuffle_op(x, 2)
    assert_bit_equal(out, expected)
    assert_bit_equal(unshuffle_op(out, 2), x)


def test_scale_one_returns_a_fresh_tensor():
    x = torch.randn(2, 3, 5, 4)
    for out in (shuffle_op(x, 1), unshuffle_op(x, 1)):
        assert_bit_equal(out, x)
        assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


# --- HF formulas and the Python wrappers -------------------------------------------------------


def test_differs_from_torch_pixel_unshuffle():
    x = torch.randn(2, 4, 6, 3)
    out = vlmkern.ops.pixel_shuffle(x, 2)
    torch_order = F.pixel_unshuffle(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)  # (c, dy, dx)
    assert out.shape == torch_order.shape
    assert not torch.equal(out, torch_order)
    regrouped = torch_order.unflatten(-1, (3, 4)).transpose(-1, -2).flatten(-2)  # -> (dy, dx, c)
    assert torch.equal(out, regrouped)


def test_internvl_formula_non_square():
    x = torch.randn(3, 6, 10, 5)
    assert_bit_equal(vlmkern.ops.pixel_shuffle(x, 2), internvl_pixel_shuffle(x, 0.5))


# (batch, tokens from the ViT, C, grid, r, which token is CLS)
MODELS = [
    pytest.param(2, 1025, 1024, (32, 32), 2, "first", id="internvl"),
    pytest.param(1, 1024, 768, (32, 32), 4, None, id="smolvlm"),
    pytest.param(1, 676, 1152, (26, 26), 2, None, id="idefics3"),
    pytest.param(1, 577, 1408, (24, 24), 2, "last", id="llama4"),
]


@pytest.mark.parametrize(("B", "tokens", "C", "grid", "r", "cls"), MODELS)
def test_model_connectors_match_hf_formulas(B, tokens, C, grid, r, cls, device):
    feats = torch.randn(B, tokens, C, dtype=torch.bfloat16).to(device)
    x = {"first": feats[:, 1:], "last": feats[:, :-1], None: feats}[cls]
    out = vlmkern.ops.pixel_shuffle(x, r, grid=grid)
    xc = x.cpu()
    internvl = internvl_pixel_shuffle(xc.reshape(B, *grid, C), 1 / r).reshape(B, -1, r * r * C)
    idefics3 = idefics3_pixel_shuffle(xc.contiguous(), r)
    assert_nontrivial(internvl)
    assert out.shape == (B, tokens // (r * r), r * r * C)
    assert_bit_equal(out, internvl)
    assert_bit_equal(out, idefics3)


@pytest.mark.parametrize(("grid", "r"), [((4, 6), 2), ((6, 3), 3), ((8, 8), 4), ((5, 7), 1)])
def test_wrapper_grid_path(grid, r, device):
    B, C = 3, 5
    H, W = grid
    x = torch.randn(B, 1 + H * W, C).to(device)[:, 1:]
    out = vlmkern.ops.pixel_shuffle(x, r, grid=grid)
    expected = reference.pixel_shuffle(x.cpu().reshape(B, H, W, C), r).reshape(B, -1, r * r * C)
    assert_nontrivial(expected)
    assert_bit_equal(out, expected)
    assert_bit_equal(reference.pixel_shuffle(x.cpu(), r, grid=grid), expected)
    y = torch.randn(B, 1 + out.shape[1], r * r * C).to(device)[:, 1:]
    back = vlmkern.ops.pixel_unshuffle(y, r, grid=grid)
    expected_back = reference.pixel_unshuffle(y.cpu().reshape(B, H // r, W // r, -1), r)
    assert_bit_equal(back, expected_back.reshape(B, H * W, C))
    assert_bit_equal(reference.pixel_unshuffle(y.cpu(), r, grid=grid), back)
    assert_bit_equal(vlmkern.ops.pixel_unshuffle(out, r, grid=grid), x)


@pytest.mark.parametrize("r", [2, 3])
def test_wrapper_grid_path_empty_batch(r, device):
    """B = 0 with a grid: (0, h·w, r²C) both ways, as the reference (a view(B, -1, ·) cannot)."""
    grid = (2 * r, 4 * r)
    x = torch.randn(0, 1 + 8 * r * r, 5).to(device)[:, 1:]
    out = vlmkern.ops.pixel_shuffle(x, r, grid=grid)
    assert out.shape == reference.pixel_shuffle(x.cpu(), r, grid=grid).shape == (0, 8, r * r * 5)
    back = vlmkern.ops.pixel_unshuffle(out, r, grid=grid)
    assert back.shape == x.shape


def test_wrapper_4d_path_matches_op():
    x = make_input((2, 6, 4, 3), torch.float32, "transposed")
    assert_bit_equal(vlmkern.ops.pixel_shuffle(x, 2), shuffle_op(x, 2))
    y = make_input((2, 3, 2, 12), torch.float32, "sliced")
    assert_bit_equal(vlmkern.ops.pixel_unshuffle(y, 2), unshuffle_op(y, 2))


class _DispatchLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def test_wrapper_grid_path_does_not_copy():
    feats = torch.randn(2, 1 + 4 * 6, 8)
    with _DispatchLog() as log:
        vlmkern.ops.pixel_shuffle(feats[:, 1:], 2, grid=(4, 6))
    kernel_calls = [args for func, args in log.calls if func is shuffle_op.default]
    others = [str(func) for func, _ in log.calls if func is not shuffle_op.default]
    assert len(kernel_calls) == 1
    assert all(func.is_view for func, _ in log.calls if func is not shuffle_op.default), others
    x = kernel_calls[0][0]
    assert x.untyped_storage().data_ptr() == feats.untyped_storage().data_ptr()


# --- hypothesis fuzz ------------------------------------------------------------------------------

FUZZ_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.bool]


def fuzz_input(shape, dtype, layout, strides, offset):
    """`make_input`, or for "as_strided" any strides (0 and overlapping ones too) and offset."""
    if layout != "as_strided":
        return make_input(shape, dtype, layout)
    span = offset + sum(max(n - 1, 0) * k for n, k in zip(shape, strides, strict=True)) + 1
    return rand((span,), dtype).as_strided(shape, strides, offset)


@settings(derandomize=True, max_examples=60, deadline=None, database=None)
@given(
    batch=st.integers(0, 3),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    r=st.integers(1, 4),
    channels=st.integers(1, 9) | st.sampled_from([64, 113, 127]),
    dtype=st.sampled_from(FUZZ_DTYPES),
    layout=st.sampled_from([*LAYOUTS, "as_strided"]),
    strides=st.tuples(*[st.sampled_from([0, 1, 2, 3, 7, 64, 1000])] * 4),
    offset=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_reference(batch, h, w, r, channels, dtype, layout, strides, offset, seed):
    torch.manual_seed(seed)
    x = fuzz_input((batch, h * r, w * r, channels), dtype, layout, strides, offset)
    assert_bit_equal(shuffle_op(x, r), reference.pixel_shuffle(x.contiguous(), r))
    y = fuzz_input((batch, h, w, r * r * channels), dtype, layout, strides, offset)
    assert_bit_equal(unshuffle_op(y, r), reference.pixel_unshuffle(y.contiguous(), r))


# --- CUDA only (skipped without a GPU) ----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [*FLOATS, torch.uint8, torch.int64, torch.complex128], ids=str)
@pytest.mark.parametrize(("shape", "r"), SHAPES)
def test_cuda_matches_cpu(shape, r, dtype, layout):
    x = make_input(shape, dtype, layout, "cuda", raw_bits=True)
    assert_bit_equal(shuffle_op(x, r), shuffle_op(x.cpu(), r))
    y = make_input(unshuffled_shape(shape, r), dtype, layout, "cuda", raw_bits=True)
    assert_bit_equal(unshuffle_op(y, r), unshuffle_op(y.cpu(), r))


@pytest.mark.gpu
def test_cuda_runs_on_the_current_stream():
    new = make_input((2, 32, 32, 1024), torch.bfloat16, "contiguous", "cuda")
    x = torch.zeros_like(new)
    expected = reference.pixel_shuffle(new.cpu(), 2)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # a kernel on the wrong stream would read x before the copy
        x.copy_(new)
        out = vlmkern.ops.pixel_shuffle(x, 2)
        back = unshuffle_op(out, 2)
    side.synchronize()
    assert out.device == x.device
    assert_bit_equal(out, expected)
    assert_bit_equal(back, new)


@pytest.mark.gpu
def test_cuda_output_is_on_the_input_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = make_input((2, 8, 8, 16), torch.bfloat16, "sliced", "cuda:1")
    with torch.cuda.device(0):
        out = vlmkern.ops.pixel_shuffle(x, 2)
    assert out.device == x.device
    assert_bit_equal(out, reference.pixel_shuffle(x.cpu().contiguous(), 2))


@pytest.mark.gpu
def test_cuda_graph_capture_matches_eager():
    feats = torch.randn(2, 1025, 1024, device="cuda", dtype=torch.bfloat16)

    def step(f):
        out = vlmkern.ops.pixel_shuffle(f[:, 1:], 2, grid=(32, 32))
        return out, vlmkern.ops.pixel_unshuffle(out, 2, grid=(32, 32))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(feats)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_back = step(feats)
    fresh = torch.randn_like(feats)
    feats.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    eager_out, eager_back = step(fresh)
    assert_nontrivial(eager_out)
    assert_bit_equal(static_out, eager_out)
    assert_bit_equal(static_back, fresh[:, 1:])
    assert_bit_equal(static_back, eager_back)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [*FLOATS, torch.uint8], ids=str)
def test_cuda_repeated_runs_are_bit_identical(dtype):
    x = make_input((2, 32, 32, 1024), dtype, "offset", "cuda")
    first_shuffle, first_unshuffle = shuffle_op(x, 2), unshuffle_op(x, 2)
    assert_nontrivial(first_shuffle)
    for _ in range(20):
        assert_bit_equal(shuffle_op(x, 2), first_shuffle)
        assert_bit_equal(unshuffle_op(x, 2), first_unshuffle)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_past_int32_indexing():
    """2**31 + 64 uint8 elements at an odd address, so the copy cannot widen to 16-byte units and
    both the element count and the source offsets pass 2**31 (the 64-bit index path)."""
    if torch.cuda.get_device_properties(0).total_memory < 16 * 2**30:
        pytest.skip("needs >= 16 GB of GPU memory")
    C = 2**28 + 8
    shape = (1, 2, 4, C)
    base = torch.randint(0, 256, (8 * C + 1,), dtype=torch.uint8, device="cuda")
    x = base[1:].view(shape)
    out = shuffle_op(x, 2)  # (1, 1, 2, 4C): token j holds columns 2j, 2j+1 of both rows
    assert out.shape == (1, 1, 2, 4 * C)
    for dy in range(2):
        for dx in range(2):
            k = dy * 2 + dx
            assert torch.equal(out[0, 0, :, k * C : (k + 1) * C], x[0, dy, dx::2, :])
    y = torch.empty_like(base)[1:].view(out.shape)
    y.copy_(out)
    del out
    assert torch.equal(unshuffle_op(y, 2), x)
