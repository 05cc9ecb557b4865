"""mlp_projector forward: the two numeric tiers (fp32 vs fp64 ≤ 1e-5; bf16/fp16 ≤ 2× PyTorch's own
error) on every connector mode × M = 0, 1, 113, 577 × layouts, the erf-vs-tanh GELU trap, output
shapes, the grid path, fuzzing, and the CUDA-only checks (auto-skipped without a GPU): graphs,
streams and repeats of the fused shuffle kernels (G8, G11), unwritten outputs (G7). Autograd,
opcheck, compile and bad inputs: test_mlp_projector_checks.py; HF modules: tests/nn."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from projector_testing import (
    MODES,
    OURS,
    REF,
    assert_lowprec_tier,
    cast,
    factor,
    fp32_rel_err,
    grads_of,
    make_weights,
    make_x,
    max_err,
    options,
    run,
)
from testing_utils import assert_nontrivial, deterministic_mode, graph_replay, profiled_names
from torch.utils._python_dispatch import TorchDispatchMode

import vlmkern

LAYOUTS = ["contiguous", "cls", "strided", "transposed"]
C, N1, D = 37, 93, 45  # odd sizes, off every tile edge


def _inputs(name, rows, layout, dtype=torch.float32, device="cpu", c=C, n1=N1, d=D):
    mode = MODES[name]
    x, grid = make_x(mode, rows, c, layout)
    weights = make_weights(mode, c, n1, d)
    x, weights = cast(x, weights, dtype)
    x = x.to(device)
    weights = {n: (t.to(device) if t is not None else None) for n, t in weights.items()}
    return mode, x, weights, options(mode, grid)


def _ref64(x, weights, opts):
    x64, w64 = cast(x.cpu(), {n: (t.cpu() if t is not None else None)
                              for n, t in weights.items()}, torch.float64)  # fmt: skip
    return run(REF, x64, w64, opts)


# --- G3(a): fp32 against the float64 reference -------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 113, 577])
@pytest.mark.parametrize("name", MODES)
def test_fp32_matches_fp64_reference(name, rows, layout):
    _, x, weights, opts = _inputs(name, rows, layout)
    out = run(OURS, x, weights, opts)
    ref64 = _ref64(x, weights, opts)
    assert_nontrivial(ref64)
    assert out.shape == ref64.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert fp32_rel_err(out, ref64) <= 1e-5
    assert fp32_rel_err(out, run(REF, x, weights, opts)) <= 1e-5  # the same chain in fp32


@pytest.mark.parametrize("name", MODES)
def test_empty_batch(name):
    mode, x, weights, opts = _inputs(name, 0, "contiguous")
    out = run(OURS, x, weights, opts)
    ref = run(REF, x, weights, opts)
    assert out.shape == ref.shape and out.numel() == 0


@pytest.mark.parametrize("name", [n for n, m in MODES.items() if m.shuffle])
def test_empty_batch_with_grid(name):
    """(0, N, C) tokens with grid=(H, W): (0, H·W/r², D) like the reference and HF's modules."""
    mode = MODES[name]
    r = mode.shuffle
    x = torch.randn(0, 1 + 8 * r * r, 8)[:, 1:]  # CLS dropped: a grid of 2r x 4r tokens
    weights, opts = make_weights(mode, 8, 16, 8), options(mode, (2 * r, 4 * r))
    out = run(OURS, x, weights, opts)
    ref = run(REF, x, weights, opts)
    assert out.shape == ref.shape == (0, 8, ref.shape[-1])


@pytest.mark.parametrize(
    ("name", "c", "n1", "d", "rows"),
    [
        pytest.param("llava", 1024, 1024, 512, 577, id="llava-clip-l"),
        pytest.param("internvl", 256, 1024, 512, 256, id="internvl"),
        pytest.param("qwen2_vl", 320, 1280, 896, 92, id="qwen2-vl"),
        pytest.param("qwen2_5_vl", 320, 1280, 896, 92, id="qwen2.5-vl"),
        pytest.param("idefics3", 128, 512, 512, 169, id="idefics3"),
    ],
)
def test_fp32_at_wide_k(name, c, n1, d, rows):
    """Long reductions (K up to 1280) still meet 1e-5 relative to fp64."""
    _, x, weights, opts = _inputs(name, rows, "cls", c=c, n1=n1, d=d)
    out = run(OURS, x, weights, opts)
    ref64 = _ref64(x, weights, opts)
    assert_nontrivial(ref64)
    assert fp32_rel_err(out, ref64) <= 1e-5


# --- G3(b): bf16 / fp16 within 2x of PyTorch's own error ----------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "cls"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", MODES)
def test_lowprec_within_2x_of_pytorch(name, dtype, layout):
    _, x, weights, opts = _inputs(name, 113, layout, dtype)
    out = run(OURS, x, weights, opts)
    assert out.dtype == dtype
    ref64 = _ref64(x, weights, opts)
    assert_nontrivial(ref64)
    assert_lowprec_tier(out, run(REF, x, weights, opts), ref64)


@pytest.mark.parametrize("rows", [1, 577])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["llava", "internvl", "qwen2_5_vl", "idefics3"])
def test_lowprec_rows_off_the_tile_edges(name, dtype, rows):
    _, x, weights, opts = _inputs(name, rows, "cls", dtype)
    ref64 = _ref64(x, weights, opts)
    assert_nontrivial(ref64)
    assert_lowprec_tier(run(OURS, x, weights, opts), run(REF, x, weights, opts), ref64)


@pytest.mark.parametrize("rows", [1023, 2047])
@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "idefics3"])
def test_fp32_rows_just_below_powers_of_two(name, rows):
    _, x, weights, opts = _inputs(name, rows, "contiguous", c=24, n1=40, d=16)
    ref64 = _ref64(x, weights, opts)
    assert_nontrivial(ref64)
    assert fp32_rel_err(run(OURS, x, weights, opts), ref64) <= 1e-5


# The connectors at their real models' widths (C, N1, D; SEMANTICS.md), a few output rows each.
REAL_WIDTHS = {
    "llava-onevision-7b": ("llava", 1152, 3584, 3584),
    "internvl2.5-8b": ("internvl", 1024, 4096, 4096),
    "qwen2-vl-7b": ("qwen2_vl", 1280, 5120, 3584),
    "qwen3-vl-8b-deepstack": ("qwen3_vl_postshuffle", 1152, 4608, 4096),
    "smolvlm2-2.2b": ("idefics3", 1152, 2048, 2048),  # r = 3: K = 10368
    "paligemma-3b": ("paligemma", 1152, 2048, 2048),
}


@pytest.mark.parametrize("case", REAL_WIDTHS)
def test_real_model_widths(case):
    name, c, n1, d = REAL_WIDTHS[case]
    _, x, weights, opts = _inputs(name, 5, "cls", c=c, n1=n1, d=d)
    ref64 = _ref64(x, weights, opts)
    assert_nontrivial(ref64)
    assert fp32_rel_err(run(OURS, x, weights, opts), ref64) <= 1e-5
    low, wlow = cast(x, weights, torch.bfloat16)
    assert_lowprec_tier(run(OURS, low, wlow, opts), run(REF, low, wlow, opts),
                        _ref64(low, wlow, opts))  # fmt: skip


# --- exact erf GELU: the fp32 tier catches a tanh GELU that the low-precision tier lets by -------


def test_tanh_gelu_fails_the_fp32_tier_but_not_the_bf16_one():
    _, x, weights, opts = _inputs("llava", 577, "contiguous")
    ref64 = _ref64(x, weights, opts)
    erf = run(OURS, x, weights, opts)
    tanh = run(OURS, x, weights, opts, activation="gelu_tanh")
    assert fp32_rel_err(erf, ref64) <= 1e-5
    assert fp32_rel_err(tanh, ref64) > 1e-5  # a tanh epilogue (cuBLASLt, apex) is caught here
    xb, wb = cast(x, weights, torch.bfloat16)
    ref64_b = _ref64(xb, wb, opts)
    tanh_b = run(OURS, xb, wb, opts, activation="gelu_tanh")
    assert_lowprec_tier(tanh_b, run(REF, xb, wb, opts), ref64_b)  # ... and not here


def test_activations_differ_from_each_other():
    _, x, weights, opts = _inputs("llava", 64, "contiguous")
    outs = {a: run(OURS, x, weights, opts, activation=a)
            for a in ("gelu", "gelu_tanh", "quick_gelu", "none")}  # fmt: skip
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert max_err(outs[a], outs[b]) > 1e-5, (a, b)


# --- shapes, modes and the wrapper -------------------------------------------------------------


@pytest.mark.parametrize("name", MODES)
def test_output_shape(name):
    mode, x, weights, opts = _inputs(name, 6, "contiguous")
    out = run(OURS, x, weights, opts)
    d = D if mode.second else N1
    if mode.shuffle:
        r = mode.shuffle
        assert out.shape == (x.shape[0], x.shape[1] // r, x.shape[2] // r, d)
    elif mode.merge:
        assert out.shape == (x.shape[0] // mode.merge**2, d)
    else:
        assert out.shape == (*x.shape[:-1], d)


@pytest.mark.parametrize("name", ["internvl", "idefics3", "shuffle_prenorm_rms"])
def test_grid_path_equals_4d_path(name):
    mode, x, weights, opts = _inputs(name, 5, "cls")
    out3 = run(OURS, x, weights, opts)
    x4 = x.unflatten(1, opts["grid"])
    out4 = run(OURS, x4, weights, {**opts, "grid": None})
    assert out3.shape == (1, 5, out4.shape[-1])
    assert torch.equal(out3, out4.reshape(out3.shape))


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def test_grid_path_hands_the_strided_view_to_the_op():
    """feats[:, 1:] reaches the op as a view of feats (no copy in the wrapper)."""
    mode, x, weights, opts = _inputs("internvl", 6, "cls")
    feats = x._base if x._base is not None else x
    with _OpLog() as log:
        run(OURS, x, weights, opts)
    ops = [args for func, args in log.calls if "mlp_projector" in str(func)]
    others = [func for func, _ in log.calls if "mlp_projector" not in str(func)]
    assert len(ops) == 1
    assert all(func.is_view for func in others), others
    assert ops[0][0].untyped_storage().data_ptr() == feats.untyped_storage().data_ptr()


def test_merge_of_prenorm_is_norm_then_view():
    """Qwen2-VL: LayerNorm on C, then x.view(-1, 4C); post-norm (Qwen3-VL DeepStack) differs."""
    _, x, weights, opts = _inputs("qwen2_vl", 9, "contiguous")
    merged = torch.nn.functional.layer_norm(x, (C,), weights["norm_weight"], weights["norm_bias"],
                                            1e-6).view(-1, 4 * C)  # fmt: skip
    expected = run(REF, merged, {**weights, "norm_weight": None, "norm_bias": None},
                   {**opts, "norm": None, "merge": None})  # fmt: skip
    assert fp32_rel_err(run(OURS, x, weights, opts), expected) <= 1e-5


def test_leading_dims_are_kept():
    _, x, weights, opts = _inputs("llava", 12, "contiguous")
    x5 = x.reshape(2, 3, 2, C)
    out = run(OURS, x5, weights, opts)
    assert out.shape == (2, 3, 2, D)
    assert torch.allclose(out.reshape(1, 12, D), run(OURS, x, weights, opts), atol=1e-6)


# --- G12: hypothesis fuzz ------------------------------------------------------------------------


@settings(derandomize=True, max_examples=60, deadline=None, database=None)
@given(
    name=st.sampled_from(sorted(MODES)),
    rows=st.integers(0, 9),
    c=st.integers(1, 9) | st.sampled_from([31, 64]),
    n1=st.integers(1, 17),
    d=st.integers(1, 17),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_reference(name, rows, c, n1, d, dtype, layout, seed):
    torch.manual_seed(seed)
    if rows == 0 and layout == "cls":
        layout = "contiguous"  # a grid has positive sides
    mode, x, weights, opts = _inputs(name, rows, layout, dtype, c=c, n1=n1, d=d)
    out = run(OURS, x, weights, opts)
    ref64 = _ref64(x, weights, opts)
    assert out.shape == ref64.shape and out.dtype == dtype
    if dtype == torch.bfloat16:
        assert_lowprec_tier(out, run(REF, x, weights, opts), ref64)
    else:
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert max_err(out, ref64) <= tol * (1 + (ref64.abs().max().item() if rows else 0))
    assert factor(mode) >= 1


# --- CUDA only (skipped without a GPU) ----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", MODES)
def test_cuda_tiers(name, dtype, layout):
    _, x, weights, opts = _inputs(name, 577, layout, dtype, device="cuda")
    out = run(OURS, x, weights, opts)
    assert out.device == x.device
    ref64 = _ref64(x, weights, opts)
    assert_nontrivial(ref64)
    if dtype == torch.float32:
        assert fp32_rel_err(out, ref64) <= 1e-5
    else:
        assert_lowprec_tier(out, run(REF, x, weights, opts), ref64)


def _on_a_side_stream(x, call):
    """call() on a side stream behind a long sleep and x's rewrite there (x zeroed before): work
    launched on another stream than the current one would read the zeros."""
    fresh = x.clone()
    x.zero_()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x.copy_(fresh)
        out = call()
    side.synchronize()
    return out


@pytest.mark.gpu
def test_cuda_runs_on_the_current_stream():
    _, x, weights, opts = _inputs("internvl", 256, "cls", torch.bfloat16, device="cuda")
    expected = run(OURS, x, weights, opts)
    assert torch.equal(_on_a_side_stream(x, lambda: run(OURS, x, weights, opts)), expected)


@pytest.mark.gpu
def test_cuda_graph_capture_and_repeats_are_bit_identical():
    _, x, weights, opts = _inputs("qwen2_5_vl", 400, "contiguous", torch.bfloat16, device="cuda")
    first = run(OURS, x, weights, opts)
    for _ in range(20):
        assert torch.equal(run(OURS, x, weights, opts), first)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(OURS, x, weights, opts)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run(OURS, x, weights, opts)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, run(OURS, x, weights, opts))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "cls", "transposed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("c", [64, 1280, 3200])  # K = 256, 5120, 12800: 2, 4, 8 vectors a thread
def test_cuda_fused_shuffle_layer_norm(c, dtype, layout, monkeypatch):
    """InternVL's pixel shuffle + LayerNorm(4C) run as one kernel on CUDA (C a multiple of 8):
    the profiler shows it and no ATen LayerNorm / shuffle copy; the output keeps the low-precision
    tier; the saved statistics and every gradient match VLMKERN_PROJECTOR_SHUFFLE_NORM=aten's
    (which runs ATen's LayerNorm: the check can fail). x is made on the GPU so the CLS-dropped
    view (storage offset, padded batch stride) and the transposed grid reach the kernel as such."""
    h, w, b = 8, 10, 2
    mode = MODES["internvl"]
    g = torch.Generator(device="cuda").manual_seed(c)
    grid = None
    if layout == "cls":
        x = torch.randn(b, 1 + h * w, c, device="cuda", generator=g).to(dtype)[:, 1:]
        grid = (h, w)
    elif layout == "transposed":
        x = torch.randn(b, w, h, c, device="cuda", generator=g).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(b, h, w, c, device="cuda", generator=g).to(dtype)
    weights = {n: None if t is None else t.to(device="cuda", dtype=dtype)
               for n, t in make_weights(mode, c, 96, 48).items()}
    opts = options(mode, grid)
    x4 = x if x.dim() == 4 else x.view(b, h, w, c)

    def forward():
        return torch.ops.vlmkern.mlp_projector(
            x4, weights["w1"], weights["b1"], weights["w2"], weights["b2"],
            weights["norm_weight"], weights["norm_bias"], "gelu", "layernorm", "post",
            opts["eps"], 2, 1)

    names = profiled_names(forward)
    assert any("shuffle_layer_norm_kernel" in n for n in names), "kernel did not run"
    assert "aten::native_layer_norm" not in names
    fused = forward()
    out = run(OURS, x, weights, opts)
    ref64 = _ref64(x, weights, opts)
    assert_lowprec_tier(out, run(REF, x, weights, opts), ref64)
    grads = grads_of(OURS, x, weights, opts)[1]
    monkeypatch.setenv("VLMKERN_PROJECTOR_SHUFFLE_NORM", "aten")
    assert "aten::native_layer_norm" in profiled_names(forward)
    unfused = forward()
    for a, b in zip(fused[3:], unfused[3:], strict=True):  # mean, rstd (fp32)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[0].float(), unfused[0].float(), rtol=2e-2, atol=2e-2)
    for name, g in grads_of(OURS, x, weights, opts)[1].items():
        torch.testing.assert_close(grads[name].float(), g.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("norm_kernel", ["fused", "aten"])
def test_cuda_past_int32_indexing(norm_kernel, monkeypatch):
    """G9: InternVL's shuffle + LayerNorm + MLP on x with 2**31 + 2**21 bf16 elements (the
    shuffled rows (M, K) too), so token offsets and the fused kernel's row offsets pass 2**31.
    Checked against float64 on the first and the last 64 output rows (the connector is
    row-wise: a row depends on its own 2 x 2 block only)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs >= 40 GB of GPU memory")
    monkeypatch.setenv("VLMKERN_PROJECTOR_SHUFFLE_NORM", norm_kernel)
    mode, c, h = MODES["internvl"], 256, 2
    w = (2**31 + 2**21) // (h * c)  # x (1, 2, W, 256): one row of 2 x 2 blocks
    weights = {n: None if t is None else t.to(device="cuda", dtype=torch.bfloat16)
               for n, t in make_weights(mode, c, 16, 8).items()}  # fmt: skip
    x = torch.randn(1, h, w, c, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31
    out = run(OURS, x, weights, options(mode))  # (1, 1, W/2, 8)
    assert out.shape == (1, 1, w // 2, 8) and not out.isnan().any()
    for cols in (slice(0, 128), slice(w - 128, w)):  # 64 blocks at each end
        part = x[:, :, cols].contiguous()
        ref64 = _ref64(part, weights, options(mode))
        assert_nontrivial(ref64)
        blocks = slice(cols.start // 2, cols.stop // 2)
        assert_lowprec_tier(out[:, :, blocks], run(REF, part, weights, options(mode)), ref64)


def _assert_repeats_stream_graph(x, weights, opts, kernel):
    """G8 + G11 on the path that launches `kernel` (the profiler shows it): 20 repeats give the
    first call's bits; so does a call on a side stream queued behind a sleep and x's rewrite
    there (work on another stream would read zeros); a CUDA graph captured from the call and
    replayed after x changes in place gives the bits of an eager call on the new x."""

    def call():
        return run(OURS, x, weights, opts)

    assert any(kernel in n for n in profiled_names(call)), f"{kernel} did not run"
    first = call()
    assert_nontrivial(first)
    for _ in range(20):
        assert torch.equal(call(), first)
    assert torch.equal(_on_a_side_stream(x, call), first)
    new = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(x)
    static = graph_replay(call, before_replay=lambda: x.copy_(new))
    eager = call()
    assert not torch.equal(eager, first)  # the replay had new data to read
    assert torch.equal(static, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "cls"])
def test_cuda_fused_shuffle_layer_norm_graph_stream_repeats(layout):
    """InternVL's one-kernel pixel shuffle + LayerNorm (the CUDA default for bf16, C % 8 == 0)
    then cuBLAS: bit-identical repeats, the current stream, CUDA-graph replay (G8, G11)."""
    _, x, weights, opts = _inputs("internvl", 256, layout, torch.bfloat16, device="cuda",
                                  c=64, n1=96, d=48)
    _assert_repeats_stream_graph(x, weights, opts, "shuffle_layer_norm_kernel")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "cls"])
def test_cuda_shuffle_gemm_graph_stream_repeats(layout, monkeypatch):
    """Idefics3's r = 3 shuffle read by the sm_90a GEMM (VLMKERN_PROJECTOR_SHUFFLE_GEMM=fused,
    C % 8 == 0, 113 rows: a partial M tile): repeats, stream and graph replay as above."""
    if torch.cuda.get_device_capability() != (9, 0) or not vlmkern.info()["cutlass_gemm"]:
        pytest.skip("the pixel-shuffle GEMM is sm_90a code in a build with the CuTe kernels")
    monkeypatch.setenv("VLMKERN_PROJECTOR_SHUFFLE_GEMM", "fused")
    _, x, weights, opts = _inputs("idefics3", 113, layout, torch.bfloat16, device="cuda",
                                  c=64, n1=96, d=96)
    _assert_repeats_stream_graph(x, weights, opts, "shuffle_gemm_kernel")


@pytest.mark.gpu
@pytest.mark.parametrize("c", [C, 64])  # odd C: the ATen shuffle; C % 8 == 0: the fused kernels
@pytest.mark.parametrize("name", MODES)
def test_cuda_every_output_element_is_written(name, c):
    """G7 on CUDA: deterministic mode NaN-fills fresh buffers; the output (bf16, 577 rows) and
    every gradient hold no NaN, and the float64 reference none either."""
    _, x, weights, opts = _inputs(name, 577, "cls", torch.bfloat16, device="cuda", c=c)
    with deterministic_mode():
        assert torch.empty(4, device="cuda").isnan().all()  # fresh buffers are poisoned
        out, grads = grads_of(OURS, x, weights, opts)
    ref64 = _ref64(x, weights, opts)
    assert_nontrivial(ref64)
    assert out.shape == ref64.shape and not ref64.isnan().any()
    assert not out.isnan().any()
    assert set(grads) == {"x"} | {n for n, t in weights.items() if t is not None}
    for n, g in grads.items():
        assert not g.isnan().any(), n
