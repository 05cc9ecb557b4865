"""mlp_projector's backward with the GELU derivative fused into the g @ w2 GEMM's epilogue
(VLMKERN_PROJECTOR_DGELU=fused, CUTLASS sm_90a): gradient tiers vs float64, PyTorch and the ATen
path for M off the tile edges and every connector mode, fallbacks, strided output gradients,
graphs, streams and bit-identical repeats. GPU tests (skipped without an H100 / H200); the
switch's CPU-visible bits run everywhere."""

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
    options,
)
from testing_utils import assert_nontrivial

from vlmkern import _C
from vlmkern.ops.mlp_projector import mlp_projector

ENV = "VLMKERN_PROJECTOR_DGELU"
LOWP = [torch.bfloat16, torch.float16]
K, N1, D = 264, 520, 136  # multiples of 8, off the 128 x 128 x 64 tile edges


@pytest.fixture
def dgelu(monkeypatch):
    """The fused dGELU for the test; the forward stays on cuBLAS, so every CUTLASS kernel the
    profiler sees is the backward's."""
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)):
        pytest.skip("the CUTLASS path needs a compute-capability-9.0 GPU (H100 / H200)")
    if not _C.cutlass_gemm:
        pytest.skip("built without CUTLASS: pip install --no-deps nvidia-cutlass, then rebuild")
    monkeypatch.setenv("VLMKERN_PROJECTOR_GEMM", "aten")
    monkeypatch.setenv("VLMKERN_PROJECTOR_SHUFFLE_GEMM", "aten")  # no other CUTLASS GEMM
    monkeypatch.setenv(ENV, "fused")
    return monkeypatch


def _inputs(mode, rows, dtype, k=K, n1=N1, d=D, layout="contiguous"):
    x, grid = make_x(mode, rows, k, layout)
    x, weights = cast(x, make_weights(mode, k, n1, d), dtype)
    weights = {n: (t.cuda() if t is not None else None) for n, t in weights.items()}
    return x.cuda(), weights, options(mode, grid)


def _assert_grad_tiers(x, weights, opts, expect_launches):
    """Gradients within 3x PyTorch's own low-precision error of float64 (and of the ATen path's
    error), with `expect_launches` CUTLASS kernels in the whole forward + backward."""
    (_, grads), launched = cutlass_kernels(lambda: grads_of(OURS, x, weights, opts))
    assert launched == expect_launches
    x64, w64 = cast(x, weights, torch.float64)
    _, grads64 = grads_of(REF, x64, w64, opts)
    _, grads_pt = grads_of(REF, x, weights, opts)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV, "aten")
        _, grads_aten = grads_of(OURS, x, weights, opts)
    for name, g in grads.items():
        assert_nontrivial(grads64[name])
        assert g.dtype == x.dtype and not g.isnan().any(), name
        assert_lowprec_tier(g, grads_pt[name], grads64[name], 3.0, f"d{name}")
        assert_lowprec_tier(g, grads_aten[name], grads64[name], 3.0, f"d{name} vs ATen")
    return grads


def _raw_backward(x, weights, grad_out):
    """The backward op on a plain LLaVA projector: (dx, dw1, db1, dw2, db2)."""
    w = [weights[n] for n in ("w1", "b1", "w2", "b2")]
    args = ("gelu", "none", "pre", 1e-5, 1, 1)
    _, hidden, act, mean, rstd = torch.ops.vlmkern.mlp_projector(x, *w, None, None, *args)
    return torch.ops.vlmkern.mlp_projector_backward(
        grad_out, x, w[0], w[2], None, None, hidden, act, mean, rstd, *args,
        [True] * 5 + [False] * 2)[:5]  # fmt: skip


def _same(grads, other) -> bool:
    return all(torch.equal(a, b) for a, b in zip(grads, other, strict=True))


# --- CPU-visible ---------------------------------------------------------------------------------


def test_switch_is_documented_and_the_cpu_backward_ignores_it(monkeypatch):
    assert ENV in mlp_projector.__doc__
    mode = MODES["llava"]
    x, grid = make_x(mode, 37, 24, "contiguous")
    weights, opts = make_weights(mode, 24, 40, 16), options(mode, grid)
    _, plain = grads_of(OURS, x, weights, opts)
    monkeypatch.setenv(ENV, "fused")
    _, switched = grads_of(OURS, x, weights, opts)
    for name, g in plain.items():
        assert_nontrivial(g)
        assert torch.equal(switched[name], g), name


# --- GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 113, 577, 4096])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_dgelu_tiers(dgelu, dtype, bias, rows):
    mode = Mode(bias1=bias, bias2=bias)
    _assert_grad_tiers(*_inputs(mode, rows, dtype), expect_launches=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_dgelu_whole_tiles(dgelu, dtype):
    """N1 = 512, D = 256 and M = 1024: every tile full (no M / N / K tails)."""
    _assert_grad_tiers(*_inputs(Mode(), 1024, dtype, n1=512, d=256), expect_launches=1)


def _fuses(mode: Mode) -> bool:
    return mode.activation == "gelu" and mode.second


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODES)
def test_dgelu_every_connector_mode(dgelu, name):
    """Exact-GELU projectors with two Linears take the fused kernel (whatever the norm, shuffle
    or merge before GEMM1); the others keep ATen's backward."""
    mode = MODES[name]
    x, weights, opts = _inputs(mode, 113, torch.bfloat16, k=40, n1=136, d=72, layout="cls")
    _assert_grad_tiers(x, weights, opts, expect_launches=int(_fuses(mode)))


FALLBACKS = {
    "n1_not_multiple_of_8": dict(n1=N1 - 4),  # the kernel's N and pre's row pitch
    "d_not_multiple_of_8": dict(d=D - 2),  # the kernel's K and g's row pitch
    "fp32": dict(dtype=torch.float32),
}


@pytest.mark.gpu
@pytest.mark.parametrize("what", FALLBACKS)
def test_unsupported_inputs_fall_back_and_stay_right(dgelu, what):
    kw = dict(FALLBACKS[what])
    dtype = kw.pop("dtype", torch.bfloat16)
    x, weights, opts = _inputs(Mode(), 577, dtype, **kw)
    if dtype == torch.float32:
        (_, grads), launched = cutlass_kernels(lambda: grads_of(OURS, x, weights, opts))
        assert launched == 0
        x64, w64 = cast(x, weights, torch.float64)
        _, grads64 = grads_of(REF, x64, w64, opts)
        for name, g in grads.items():
            scale = grads64[name].abs().max().item()
            assert (g.double().cpu() - grads64[name].cpu()).abs().max().item() <= 1e-4 * scale
        return
    _assert_grad_tiers(x, weights, opts, expect_launches=0)


@pytest.mark.gpu
@pytest.mark.parametrize("pitch", [8, 4], ids=["pitch_multiple_of_8", "pitch_off_the_grid"])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_strided_output_gradient(dgelu, dtype, pitch):
    """grad_out rows with a pitch D + 8 (a column slice) are read in place: the same dh, so the
    same dx, dw1 and db1 bit for bit (dw2 and db2 are cuBLAS's / ATen's on differently strided
    operands: within the tiers); a pitch D + 4 (rows not 16-byte aligned) falls back."""
    x, weights, _ = _inputs(Mode(), 577, dtype)
    g = torch.randn(1, 577, D + pitch, device="cuda", dtype=dtype)[..., :D]
    strided, launched = cutlass_kernels(lambda: _raw_backward(x, weights, g))
    assert launched == (1 if pitch == 8 else 0)
    contiguous = _raw_backward(x, weights, g.contiguous())
    if pitch == 8:
        assert _same(strided[:3], contiguous[:3])  # dx, dw1, db1
    for a, b in zip(strided, contiguous, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


@pytest.mark.gpu
def test_dgelu_graph_capture_streams_and_repeats(dgelu):
    x, weights, _ = _inputs(Mode(), 577, torch.bfloat16)
    g = torch.randn(1, 577, D, device="cuda", dtype=torch.bfloat16)
    first = _raw_backward(x, weights, g)
    for _ in range(20):
        assert _same(_raw_backward(x, weights, g), first)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the kernel must queue behind this, on `side`
        on_side = _raw_backward(x, weights, g)
    torch.cuda.current_stream().wait_stream(side)
    assert _same(on_side, first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _raw_backward(x, weights, g)
    g.copy_(torch.randn_like(g))
    graph.replay()
    torch.cuda.synchronize()
    assert _same(static, _raw_backward(x, weights, g))


@pytest.mark.gpu
def test_bad_switch_value_is_rejected(dgelu):
    dgelu.setenv(ENV, "cutlass")
    x, weights, opts = _inputs(Mode(), 8, torch.bfloat16)
    with pytest.raises(RuntimeError, match="VLMKERN_PROJECTOR_DGELU must be 'fused' or 'aten'"):
        grads_of(OURS, x, weights, opts)
