"""The pixel-shuffle GEMM on CUDA (VLMKERN_PROJECTOR_SHUFFLE_GEMM=fused; `gpu`, sm_90a only, the
rest skip): a norm-free shuffled projector's first Linear reads its rows through the shuffle's
index map. Idefics3 / SmolVLM (r = 2, 3, 4; one Linear, no bias) and a shuffle + GELU + second
Linear chain with biases: the profiler shows the kernel and no shuffle copy or GEMM1 matmul; the
output keeps the low-precision tier against float64; the outputs and every gradient match the
copy + cuBLAS path; x views (CLS dropped, a transposed grid, padded batch stride) reach the kernel
as such; tails in M, N and K; a bad env value raises. InternVL (shuffle -> LayerNorm(4C) ->
Linear -> GELU -> Linear): a statistics pass (the shuffle + LayerNorm kernel without its output)
and the GEMM normalizing its A tiles in shared memory, no ATen LayerNorm, with and without the
norm's bias, at InternVL2.5-8B's widths too; every gradient matches the default path. Qwen's
mergers (LayerNorm / RMSNorm per token before the 2x2 merge, LayerNorm after it): the same GEMM on
the merged rows (r = 1) with per-token statistics, at Qwen2-VL-7B's widths too."""

import pytest
import torch
from projector_testing import (
    MODES,
    OURS,
    REF,
    Mode,
    assert_lowprec_tier,
    grads_of,
    make_weights,
    make_x,
    options,
    run,
)
from testing_utils import profiled_names

import vlmkern

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _sm90_only():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the pixel-shuffle GEMM is sm_90a code")
    if not vlmkern.info()["cutlass_gemm"]:
        pytest.skip("built without the sm_90a CuTe kernels (gpu_check's info stage flags this)")


def _x(layout, b, h, w, c, dtype):
    """x made on the GPU, so the view's strides reach the kernel; returns (x, grid or None)."""
    g = torch.Generator(device="cuda").manual_seed(h * w + c)
    if layout == "cls":  # (B, 1 + H W, C)[:, 1:] with its grid: offset, padded batch stride
        return torch.randn(b, 1 + h * w, c, device="cuda", generator=g).to(dtype)[:, 1:], (h, w)
    if layout == "transposed":
        return torch.randn(b, w, h, c, device="cuda", generator=g).to(dtype).transpose(1, 2), None
    return torch.randn(b, h, w, c, device="cuda", generator=g).to(dtype), None


def _check(mode, layout, c, n1, d, r, dtype, monkeypatch, b=2, h=None, w=None, norm_bias=True,
           x=None):
    """x: the input (a Qwen merger's tokens), else a (B, H, W, C) grid of `layout`."""
    h, w = h or 3 * r, w or 5 * r  # M = b * 15 rows: one partial tile
    x, grid = (x, None) if x is not None else _x(layout, b, h, w, c, dtype)
    weights = {n: None if t is None else t.to(device="cuda", dtype=dtype)
               for n, t in make_weights(mode, c, n1, d).items()}
    if not norm_bias:
        weights["norm_bias"] = None
    opts = {**options(mode, grid), "shuffle": r}
    monkeypatch.setenv("VLMKERN_PROJECTOR_SHUFFLE_GEMM", "fused")
    names = profiled_names(lambda: run(OURS, x, weights, opts))
    if mode.norm == "rmsnorm":  # the composite's RMSNorm (pow, mean, rsqrt) did not run
        assert not names & {"aten::rsqrt", "aten::pow"}, names
    assert any("shuffle_gemm_kernel" in n for n in names), "the kernel did not run"
    assert not any("pixel_shuffle" in n for n in names), "a shuffled copy was made"
    if mode.norm:  # the statistics pass, no ATen norm
        assert any("shuffle_layer_norm_kernel" in n for n in names), "no statistics pass"
        assert not any("layer_norm" in n and n.startswith("aten::") for n in names), names
    if not mode.second:
        assert not names & {"aten::mm", "aten::addmm"}
    out, grads = grads_of(OURS, x, weights, opts)
    ref64 = run(REF, x.double(), {n: None if t is None else t.double()
                                  for n, t in weights.items()}, opts)
    assert_lowprec_tier(out, run(REF, x, weights, opts), ref64)
    monkeypatch.setenv("VLMKERN_PROJECTOR_SHUFFLE_GEMM", "aten")
    assert not any("shuffle_gemm_kernel" in n for n in profiled_names(
        lambda: run(OURS, x, weights, opts)))
    out_aten, grads_aten = grads_of(OURS, x, weights, opts)
    torch.testing.assert_close(out.float(), out_aten.float(), rtol=2e-2, atol=2e-2)
    for name, g in grads_aten.items():  # the backward recomputes the shuffle either way
        torch.testing.assert_close(grads[name].float(), g.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "cls", "transposed"])
@pytest.mark.parametrize("r", [2, 3, 4])
@pytest.mark.parametrize(("c", "n1"), [(64, 576), (72, 93), (1152, 200)])  # K tails, odd N
def test_idefics3(c, n1, r, layout, dtype, monkeypatch):
    _check(MODES["idefics3"], layout, c, n1, n1, r, dtype, monkeypatch)


@pytest.mark.parametrize("c", [8, 16, 32, 48])  # K = 32, 64, 128, 192: 1 (partial) to 3 k tiles
def test_few_k_tiles(c, monkeypatch):
    _check(MODES["idefics3"], "cls", c, 136, 136, 2, torch.bfloat16, monkeypatch, b=1)


def test_misaligned_view_falls_back(monkeypatch):
    """A channel slice starting 8 bytes into a row cannot feed 16-byte cp.async: the copy +
    cuBLAS path runs instead, with the same result."""
    mode = MODES["idefics3"]
    x = torch.randn(2, 6, 8, 72, device="cuda").to(torch.bfloat16)[..., 4:68]  # C = 64
    weights = {n: None if t is None else t.to(device="cuda", dtype=torch.bfloat16)
               for n, t in make_weights(mode, 64, 96, 96).items()}
    opts = {**options(mode), "shuffle": 2}
    monkeypatch.setenv("VLMKERN_PROJECTOR_SHUFFLE_GEMM", "fused")
    names = profiled_names(lambda: run(OURS, x, weights, opts))
    assert not any("shuffle_gemm_kernel" in n for n in names)
    out = run(OURS, x, weights, opts)
    monkeypatch.setenv("VLMKERN_PROJECTOR_SHUFFLE_GEMM", "aten")
    assert torch.equal(out, run(OURS, x, weights, opts))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_shuffle_gelu_two_linears(dtype, monkeypatch):
    """Biases, GELU and a second Linear after the fused GEMM1 (hidden and act kept for dW2)."""
    mode = Mode(shuffle=2)  # no norm: the fused path applies
    _check(mode, "cls", 96, 136, 72, 2, dtype, monkeypatch, b=3, h=16, w=10)


def test_smolvlm_256m_shape(monkeypatch):
    """SmolVLM-256M: (B, 32, 32, 768) -> r 4 -> (B, 64, 12288) -> 576: 192 k tiles."""
    _check(MODES["idefics3"], "contiguous", 768, 576, 576, 4, torch.bfloat16, monkeypatch,
           b=3, h=32, w=32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "cls", "transposed"])
@pytest.mark.parametrize(("c", "n1", "d"), [(8, 136, 72), (32, 136, 72), (64, 136, 72),
                                             (72, 93, 40), (256, 512, 200)])
def test_internvl_layernorm(c, n1, d, layout, dtype, monkeypatch):
    """K = 32 (one partial k tile: the prologue alone), 128 (two), 256 (4 whole k tiles), 288 (a
    half tile: unnormalized zero columns), 1024."""
    _check(MODES["internvl"], layout, c, n1, d, 2, dtype, monkeypatch)


def test_internvl_layernorm_without_bias(monkeypatch):
    _check(MODES["internvl"], "cls", 64, 136, 72, 2, torch.bfloat16, monkeypatch,
           norm_bias=False)


def test_internvl2_5_8b_shape(monkeypatch):
    """InternVL2.5-8B: (B, 32, 32, 1024) -> r 2 -> LayerNorm(4096) -> 4096 -> GELU -> 4096, a
    batch of 3 tiles (768 rows: whole row tiles)."""
    _check(MODES["internvl"], "cls", 1024, 4096, 4096, 2, torch.bfloat16, monkeypatch,
           b=3, h=32, w=32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl_postshuffle"])
@pytest.mark.parametrize(("c", "n1", "d", "rows"), [(64, 136, 72, 37), (72, 200, 40, 130)])
def test_qwen_mergers(rows, c, n1, d, name, layout, dtype, monkeypatch):
    """Tokens (4 rows, C) -> norm per token (or per merged row) -> Linear(4C): rows tails past a
    128-row tile, K = 256 / 288 (a half k tile), strided tokens (copied by the reshape)."""
    mode = MODES[name]
    x, _ = make_x(mode, rows, c, layout, dtype, "cuda")
    _check(mode, layout, c, n1, d, None, dtype, monkeypatch, x=x)


def test_qwen2_vl_7b_merger(monkeypatch):
    """Qwen2-VL-7B: 1280 -> LayerNorm per token -> merge 4 -> 5120 -> GELU -> 3584; 1024 rows."""
    mode = MODES["qwen2_vl"]
    x, _ = make_x(mode, 1024, 1280, "contiguous", torch.bfloat16, "cuda")
    _check(mode, "contiguous", 1280, 5120, 3584, None, torch.bfloat16, monkeypatch, x=x)


def test_bad_env_value(monkeypatch):
    monkeypatch.setenv("VLMKERN_PROJECTOR_SHUFFLE_GEMM", "cutlass")
    x = torch.randn(1, 4, 4, 8, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="VLMKERN_PROJECTOR_SHUFFLE_GEMM must be 'fused' or"):
        vlmkern.ops.mlp_projector(x, w, None, None, None, activation="none", shuffle=2)
