"""Shared test helpers: random inputs in several memory layouts, bitwise comparison, and the
deterministic-mode switch that NaN-fills fresh buffers (G7)."""

import contextlib

import torch

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
# Every element size the op moves (1, 2, 4, 8, 16 bytes); floats also as raw bits (NaN payloads).
ALL_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32,
    torch.int64, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2, torch.float16,
    torch.bfloat16, torch.float32, torch.float64, torch.complex32, torch.complex64,
    torch.complex128,
]  # fmt: skip
LAYOUTS = ["contiguous", "sliced", "channel_strided", "transposed", "expanded", "offset"]

# (B, H, W, C), r: size-0/1 dims, r = 1..4, non-square, odd and tile-edge C, real model grids.
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def rand(shape, dtype, device="cpu", raw_bits=False):
    """Random values (randn for floats) or, with raw_bits, random bytes reinterpreted as dtype."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, device=device).bool()
    if raw_bits or not (dtype.is_floating_point or dtype.is_complex) or dtype.itemsize == 1:
        nbytes = dtype.itemsize
        raw = torch.randint(0, 256, (*shape, nbytes), dtype=torch.uint8, device=device)
        return raw.view(dtype).squeeze(-1)
    return torch.randn(shape, device=device).to(dtype)


def make_input(shape, dtype, layout, device="cpu", raw_bits=False):
    """A (B, H, W, C) tensor of random data laid out in memory as `layout` describes."""
    B, H, W, C = shape
    if layout == "contiguous":
        return rand((B, H, W, C), dtype, device, raw_bits)
    if layout == "sliced":  # stride-2 rows
        return rand((B, 2 * H, W, C), dtype, device, raw_bits)[:, ::2]
    if layout == "channel_strided":  # stride-2 innermost dim
        return rand((B, H, W, 2 * C), dtype, device, raw_bits)[..., ::2]
    if layout == "transposed":
        return rand((B, W, H, C), dtype, device, raw_bits).transpose(1, 2)
    if layout == "expanded":  # batch stride 0
        return rand((1, H, W, C), dtype, device, raw_bits).expand(B, H, W, C)
    if layout == "offset":  # CLS token dropped: storage offset and a padded batch stride
        return rand((B, H * W + 1, C), dtype, device, raw_bits)[:, 1:].unflatten(1, (H, W))
    raise AssertionError(layout)


def bits(t):
    """Same-size integer view, so comparisons are bitwise (NaN, -0.0 and bool included)."""
    if t.element_size() == 16:
        return torch.view_as_real(t).view(torch.int64)
    return t.view(_INT_OF_SIZE[t.element_size()])


def assert_bit_equal(out, expected):
    assert out.shape == expected.shape and out.dtype == expected.dtype
    mismatch = bits(out.cpu()) != bits(expected.cpu())
    if mismatch.any():
        first = mismatch.nonzero()[0].tolist()
        raise AssertionError(f"{int(mismatch.sum())}/{mismatch.numel()} differ, first at {first}")


def assert_nontrivial(t):
    """The expected tensor has data worth comparing (an empty one is checked by shape only)."""
    assert t.numel() == 0 or bits(t.cpu()).ne(0).any()


@contextlib.contextmanager
def deterministic_mode():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@contextlib.contextmanager
def no_host_sync():
    """CUDA work inside raises on any host sync (torch.cuda.set_sync_debug_mode("error")); the
    device is synchronized first, so earlier work cannot trip it."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def profiled_names(fn) -> set[str]:
    """Names of the events (CUDA kernels included) while fn() runs and the device syncs; CPU
    activity is recorded too: with CUDA alone Kineto has been seen to drop kernel events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}


def graph_replay(fn, before_replay=None):
    """fn() warmed up on a side stream (first-call host work stays out of the capture), captured
    in a CUDA graph and replayed once: the captured output, after the replay. ``before_replay()``
    runs between capture and replay (to put new data in the captured inputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    if before_replay is not None:
        before_replay()
    graph.replay()
    torch.cuda.synchronize()
    return static


def compile_recording(fn, **options):
    """torch.compile(fn, fullgraph=True, **options) with a backend that keeps every dynamo graph
    it is given (and runs it as is): (compiled fn, the list the graphs land in)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(fn, fullgraph=True, backend=backend, **options), graphs


def sync_points(graph: torch.fx.GraphModule) -> list[str]:
    """The nodes of a dynamo graph that read a tensor's value on the host (item / tolist, and
    the asserts on the unbacked symbols they make): each is a host sync on CUDA."""
    return [n.name for n in graph.graph.nodes
            if (n.op == "call_method" and n.target in ("item", "tolist"))
            or "scalar" in str(n.target)]
