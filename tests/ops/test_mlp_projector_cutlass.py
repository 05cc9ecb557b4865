"""mlp_projector on the fused CUTLASS GEMM (VLMKERN_PROJECTOR_GEMM=cutlass*, sm_90a; cutlass_sm80:
the CUTLASS 2.x kernel of every sm_80+ GPU): numeric tiers vs float64 and vs the ATen path for
every activation × bias × M, fallback on unaligned inputs, strided A, hidden = the
pre-activation, unchanged gradients, graphs and bit-identical repeats. GPU tests (skipped without
CUDA); the switch's CPU-visible bits run everywhere."""

import pytest
import torch
from projector_testing import (
    MODES,
    OURS,
    REF,
    Mode,
    assert_lowprec_tier,
    cast,
    cutlass_kernels,
    grads_of,
    make_weights,
    make_x,
    max_err,
    options,
    run,
)
from testing_utils import assert_nontrivial

import vlmkern
from vlmkern import _C
from vlmkern.ops.mlp_projector import mlp_projector

ENV = "VLMKERN_PROJECTOR_GEMM"
LOWP = [torch.bfloat16, torch.float16]
ACTS = ["gelu", "gelu_tanh", "quick_gelu", "none"]
K, N1, D = 264, 520, 136  # multiples of 8, off the 128 x 128 x 64 tile edges


def _is_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture
def cutlass(monkeypatch):
    """Selects the CUTLASS path for the test (the C++ side reads the variable on every call)."""
    if not _is_sm90():
        pytest.skip("the CUTLASS path needs a compute-capability-9.0 GPU (H100 / H200)")
    if not _C.cutlass_gemm:
        pytest.skip("built without CUTLASS: pip install --no-deps nvidia-cutlass, then rebuild")
    monkeypatch.setenv(ENV, "cutlass")
    return monkeypatch


def _plain(rows, act, bias, dtype, k=K, n1=N1, d=D, second=True):
    """A plain-rows projector (no norm / shuffle): x (1, rows, k), w1 (n1, k), w2 (d, n1)."""
    mode = Mode(activation=act, bias1=bias, bias2=bias and second, second=second)
    x, _ = make_x(mode, rows, k, "contiguous")
    weights = make_weights(mode, k, n1, d)
    x, weights = cast(x, weights, dtype)
    weights = {n: (t.cuda() if t is not None else None) for n, t in weights.items()}
    return x.cuda(), weights, options(mode)


def _ref64(x, weights, opts):
    x64, w64 = cast(x.cpu(), {n: (t.cpu() if t is not None else None)
                              for n, t in weights.items()}, torch.float64)  # fmt: skip
    return run(REF, x64, w64, opts)


# --- CPU-visible: the build flag and the switch's default --------------------------------------


def test_build_info_reports_the_cutlass_path():
    assert isinstance(vlmkern.info()["cutlass_gemm"], bool)
    assert isinstance(vlmkern.info()["cutlass_sm80_gemm"], bool)
    assert "VLMKERN_PROJECTOR_GEMM" in mlp_projector.__doc__  # the switch is documented


# --- GPU -----------------------------------------------------------------------------------------


GEMMS = ["cutlass", "cutlass_pingpong", "cutlass_wide", "cutlass_sm80"]


def _launches(gemm: str, act: str, second: bool) -> int:
    """CUTLASS launches of one projector call: "cutlass" / "cutlass_wide" / "cutlass_sm80" run
    GEMM1 (+ bias, + GELU epilogue for "gelu") and GEMM2; "cutlass_pingpong" only a GELU GEMM1,
    everything else on cuBLAS."""
    if gemm in ("cutlass", "cutlass_wide", "cutlass_sm80"):
        return 2 if second else 1
    return 1 if act == "gelu" else 0


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 113, 577, 4096])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("gemm", GEMMS)
def test_cutlass_tiers(cutlass, gemm, dtype, act, bias, rows):
    cutlass.setenv(ENV, gemm)
    x, weights, opts = _plain(rows, act, bias, dtype)
    out, launched = cutlass_kernels(lambda: run(OURS, x, weights, opts))
    assert launched == _launches(gemm, act, second=True)
    ref64 = _ref64(x, weights, opts)
    assert_nontrivial(ref64)
    assert out.dtype == dtype and out.is_contiguous() and not out.isnan().any()
    assert_lowprec_tier(out, run(REF, x, weights, opts), ref64)
    cutlass.setenv(ENV, "aten")
    aten = run(OURS, x, weights, opts)
    assert_lowprec_tier(out, aten, ref64, what="vs the ATen path")


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODES)
@pytest.mark.parametrize("gemm", GEMMS)
def test_cutlass_every_connector_mode(cutlass, gemm, name):
    cutlass.setenv(ENV, gemm)
    mode = MODES[name]
    x, grid = make_x(mode, 113, 40, "cls")
    weights = make_weights(mode, 40, 136, 72)
    x, weights = cast(x, weights, torch.bfloat16)
    x, weights = x.cuda(), {n: (t.cuda() if t is not None else None) for n, t in weights.items()}
    opts = options(mode, grid)
    out, launched = cutlass_kernels(lambda: run(OURS, x, weights, opts))
    assert launched == _launches(gemm, mode.activation, mode.second)
    ref64 = _ref64(x, weights, opts)
    assert_nontrivial(ref64)
    assert_lowprec_tier(out, run(REF, x, weights, opts), ref64)


@pytest.mark.gpu
def test_fp32_never_takes_the_cutlass_path(cutlass):
    x, weights, opts = _plain(113, "gelu", True, torch.float32)
    out, launched = cutlass_kernels(lambda: run(OURS, x, weights, opts))
    assert launched == 0
    ref64 = _ref64(x, weights, opts)
    assert max_err(out, ref64) <= 1e-5 * ref64.abs().max().item()


# What falls back, and how many CUTLASS GEMMs remain: GEMM2 (K = N1, N = D) still qualifies unless
# N1 is off the 8-element grid, since it reads GEMM1's freshly allocated output.
UNALIGNED = {
    "k_not_multiple_of_8": 1,  # GEMM1's K = 262
    "n1_not_multiple_of_8": 0,  # GEMM1's N and GEMM2's K = 516
    "misaligned_x": 1,  # A's pointer 2-byte aligned (storage offset of one element)
    "w1_not_contiguous": 1,  # w1 (N1, K) a column slice
}


@pytest.mark.gpu
@pytest.mark.parametrize("what", UNALIGNED)
def test_unaligned_inputs_fall_back_and_stay_right(cutlass, what):
    k = K - 2 if what == "k_not_multiple_of_8" else K
    n1 = N1 - 4 if what == "n1_not_multiple_of_8" else N1
    x, weights, opts = _plain(577, "gelu", True, torch.bfloat16, k=k, n1=n1)
    if what == "misaligned_x":
        x = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")[1:].view_as(x).copy_(x)
    if what == "w1_not_contiguous":
        weights["w1"] = torch.cat([weights["w1"], weights["w1"]], 1)[:, :k]
    out, launched = cutlass_kernels(lambda: run(OURS, x, weights, opts))
    assert launched == UNALIGNED[what]
    ref64 = _ref64(x, weights, opts)
    assert_nontrivial(ref64)
    assert_lowprec_tier(out, run(REF, x, weights, opts), ref64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_cutlass_reads_strided_rows(cutlass, dtype):
    """A (M, K) with a row stride > K: the CLS-dropped view feats[:, 1:] and a column slice."""
    x, weights, opts = _plain(577, "gelu", True, dtype)
    for view in (torch.cat([x[:, :1], x], 1)[:, 1:],  # storage offset K, batch stride (M+1)K
                 torch.cat([x, x[..., :16]], -1)[..., :K]):  # row stride K + 16
        out, launched = cutlass_kernels(lambda v=view: run(OURS, v, weights, opts))
        assert launched == 2
        assert_lowprec_tier(out, run(REF, x, weights, opts), _ref64(x, weights, opts))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("second", [True, False], ids=["two_linears", "single_linear"])
def test_hidden_is_the_pre_activation(cutlass, dtype, second):
    x, weights, opts = _plain(577, "gelu", True, dtype, second=second)
    w = [weights[n] for n in ("w1", "b1", "w2", "b2")]
    out, hidden, _, _, _ = torch.ops.vlmkern.mlp_projector(
        x, *w, None, None, "gelu", "none", "pre", 1e-5, 1, 1)
    h64 = x[0].double() @ weights["w1"].double().t() + weights["b1"].double()
    h_pt = torch.addmm(weights["b1"], x[0], weights["w1"].t())
    assert hidden.shape == h64.shape and hidden.dtype == dtype
    assert_lowprec_tier(hidden, h_pt, h64, what="hidden")
    if not second:  # out = gelu(fp32 pre-activation) rounded once: within an ulp of gelu(hidden)
        assert max_err(out.view_as(hidden), torch.nn.functional.gelu(hidden.float())) <= 2 * (
            torch.finfo(dtype).eps * (1 + hidden.float().abs().max().item()))


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_cutlass_backward_matches_aten(cutlass, act):
    x, weights, opts = _plain(577, act, True, torch.bfloat16)
    out, grads = grads_of(OURS, x, weights, opts)
    cutlass.setenv(ENV, "aten")
    out_aten, grads_aten = grads_of(OURS, x, weights, opts)
    x64, w64 = cast(x, weights, torch.float64)
    _, grads64 = grads_of(REF, x64, w64, opts)
    _, grads_pt = grads_of(REF, x, weights, opts)
    for name, g in grads.items():
        assert_nontrivial(grads64[name])
        assert_lowprec_tier(g, grads_pt[name], grads64[name], 3.0, f"d{name}")
        assert_lowprec_tier(g, grads_aten[name], grads64[name], 3.0, f"d{name} vs ATen")


@pytest.mark.gpu
def test_cutlass_graph_capture_streams_and_repeats(cutlass):
    x, weights, opts = _plain(577, "gelu", True, torch.bfloat16)
    first = run(OURS, x, weights, opts)
    for _ in range(20):
        assert torch.equal(run(OURS, x, weights, opts), first)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the kernel must queue behind this, on `side`
        on_side = run(OURS, x, weights, opts)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side, first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run(OURS, x, weights, opts)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, run(OURS, x, weights, opts))


@pytest.mark.gpu
def test_bad_switch_value_is_rejected(monkeypatch):
    monkeypatch.setenv(ENV, "cublas")
    x, weights, opts = _plain(8, "gelu", True, torch.bfloat16)
    with pytest.raises(RuntimeError, match="VLMKERN_PROJECTOR_GEMM must be 'aten', 'cutlass', "
                       "'cutlass_pingpong', 'cutlass_wide' or 'cutlass_sm80'"):
        run(OURS, x, weights, opts)


# --- the pingpong schedule (VLMKERN_PROJECTOR_GEMM=cutlass_pingpong; tiers and connector modes
# above run it too): the aux output through the backward, graphs and repeats ---


@pytest.fixture
def pingpong(cutlass):
    cutlass.setenv(ENV, "cutlass_pingpong")
    return cutlass


def check_hidden_backward_and_graph():
    """The aux (pre-activation) output feeds the backward (3x PyTorch's error vs float64); graph
    replay and repeats are exact (the selected GEMM path: the caller's switch)."""
    x, weights, opts = _plain(577, "gelu", True, torch.bfloat16)
    out, grads = grads_of(OURS, x, weights, opts)
    x64, w64 = cast(x, weights, torch.float64)
    _, grads64 = grads_of(REF, x64, w64, opts)
    _, grads_pt = grads_of(REF, x, weights, opts)
    for name, g in grads.items():
        assert_nontrivial(grads64[name])
        assert_lowprec_tier(g, grads_pt[name], grads64[name], 3.0, f"d{name}")
    eager = run(OURS, x, weights, opts)
    for _ in range(5):
        assert torch.equal(run(OURS, x, weights, opts), eager)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(OURS, x, weights, opts)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run(OURS, x, weights, opts)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, eager)


@pytest.mark.gpu
def test_pingpong_hidden_backward_and_graph(pingpong):
    check_hidden_backward_and_graph()


# --- the sm_80+ kernel (VLMKERN_PROJECTOR_GEMM=cutlass_sm80; on H100 the tests above run it too):
# any compute capability 8.x / 9.x GPU, its own alignment rule for the bias, backward, graphs ---


@pytest.fixture
def sm80(monkeypatch):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the sm_80 CUTLASS kernel needs compute capability 8.0+")
    if not _C.cutlass_sm80_gemm:
        pytest.skip("built without CUTLASS: pip install --no-deps nvidia-cutlass, then rebuild")
    monkeypatch.setenv(ENV, "cutlass_sm80")
    return monkeypatch


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 113, 577])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_sm80_tiers_on_any_sm80_gpu(sm80, dtype, bias, rows):
    x, weights, opts = _plain(rows, "gelu", bias, dtype)
    out, launched = cutlass_kernels(lambda: run(OURS, x, weights, opts))
    assert launched == 2
    ref64 = _ref64(x, weights, opts)
    assert_lowprec_tier(out, run(REF, x, weights, opts), ref64)


@pytest.mark.gpu
def test_sm80_misaligned_bias_falls_back(sm80):
    """The sm_80 epilogue reads the bias in 16-byte vectors: a bias at a 2-byte offset takes
    cuBLAS for GEMM1 (GEMM2's bias is aligned: it still runs)."""
    x, weights, opts = _plain(113, "gelu", True, torch.bfloat16)
    b1 = weights["b1"]
    weights["b1"] = torch.empty(b1.numel() + 1, dtype=b1.dtype, device="cuda")[1:].copy_(b1)
    out, launched = cutlass_kernels(lambda: run(OURS, x, weights, opts))
    assert launched == 1
    assert_lowprec_tier(out, run(REF, x, weights, opts), _ref64(x, weights, opts))


@pytest.mark.gpu
def test_sm80_hidden_backward_and_graph(sm80):
    check_hidden_backward_and_graph()
