"""gated_linear (``residual + tanh(gate) · (x @ wᵀ + b)``, Mllama / Flamingo): both numerics
tiers against the float64 reference, gradients (gradcheck and the low-precision tier), layouts,
the gate = 0 identity, opcheck, torch.compile, unwritten outputs, bad inputs, fuzz; on CUDA the
fused cuBLASLt path (profiled), CUDA graphs, streams and determinism."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testing_utils import FLOATS, assert_nontrivial, deterministic_mode, profiled_names
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import vlmkern
from vlmkern import reference

OP = torch.ops.vlmkern.gated_linear
NAMES = ("x", "weight", "gate", "residual", "bias")


def make(lead, k, n, dtype=torch.float32, device="cpu", *, bias=True, gate=0.7, layout="contiguous",
         gate_shape=(1,)):
    """(x (*lead, K), weight (N, K), gate, residual (*lead, N), bias (N,) or None) in `layout`:
    contiguous, sliced (stride-2 rows / features), transposed (x and weight column-major)."""
    g = torch.Generator().manual_seed(hash((lead, k, n)) % 2**31)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if layout == "sliced":
        x = rnd(*lead, 2 * k)[..., ::2]
        residual = rnd(*lead, n + 3)[..., :n]
        weight = rnd(2 * n, k)[::2]
    elif layout == "transposed":
        x = rnd(k, *lead).movedim(0, -1)
        residual = rnd(*lead, n)
        weight = rnd(k, n).t()
    else:
        x, residual, weight = rnd(*lead, k), rnd(*lead, n), rnd(n, k)
    weight = weight / max(k, 1) ** 0.5
    args = [x, weight, torch.full(gate_shape, gate, dtype=torch.float64), residual,
            rnd(n) if bias else None]
    return [None if t is None else t.to(device=device, dtype=dtype) for t in args]


def ref64(args):
    return reference.gated_linear(*[None if t is None else t.double().cpu() for t in args])


def err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item() if a.numel() else 0.0


SHAPES = [((1,), 16, 8), ((113,), 33, 17), ((2, 7), 64, 48), ((0,), 8, 4), ((3, 0, 5), 7, 9),
          ((577,), 40, 24), ((1, 1), 1, 1), ((4,), 0, 6)]


@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_float64(lead, k, n, layout, bias, device):
    args = make(lead, k, n, device=device, bias=bias, layout=layout)
    out = OP(*args)
    ref = ref64(args)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert_nontrivial(ref)
    scale = ref.abs().max().item() if ref.numel() else 1.0
    # K-scaled bound: one fp32 GEMM (TF32 is off unless the user allows it).
    assert err(out, ref) <= 1e-6 * (1 + max(k, 1) ** 0.5) * max(scale, 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,k,n", [((113,), 256, 96), ((2, 64), 512, 128), ((1,), 128, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_low_precision_tier(dtype, lead, k, n, bias, device):
    """G3(b): error vs float64 <= 2x that of HF's formula run in the same dtype."""
    args = make(lead, k, n, dtype, device, bias=bias)
    ref = ref64(args)
    pt = reference.gated_linear(*args)
    ours = OP(*args)
    assert err(ours, ref) <= 2 * err(pt, ref) + 1e-6 * (1 + ref.abs().max().item())


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("gate_shape", [(1,), ()])
def test_zero_gate_returns_the_residual_exactly(dtype, gate_shape, device):
    """Mllama's gates start at 0: the layer is then the identity on the residual stream."""
    args = make((5, 3), 24, 16, dtype, device, gate=0.0, gate_shape=gate_shape)
    assert torch.equal(OP(*args), args[3])


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gate", [0.4, 0.0])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_gradcheck(bias, gate, layout):
    args = [t.requires_grad_() if t is not None else None
            for t in make((2, 3), 5, 4, torch.float64, bias=bias, gate=gate, layout=layout)]
    assert torch.autograd.gradcheck(lambda *a: OP(*a), tuple(args))


@pytest.mark.parametrize("mask", [(1, 0, 0, 0, 0), (0, 1, 0, 0, 0), (0, 0, 1, 0, 0),
                                  (0, 0, 0, 1, 0), (0, 0, 0, 0, 1), (1, 0, 1, 0, 0)])
def test_each_gradient_alone(mask):
    """The backward's branches by output_mask (the gate's gradient with and without dx / dw)."""
    base = make((3, 4), 6, 5, torch.float64)
    leaves = [t.clone().requires_grad_(bool(m)) for t, m in zip(base, mask, strict=True)]
    refs = [t.clone().requires_grad_(bool(m)) for t, m in zip(base, mask, strict=True)]
    g = torch.randn(3, 4, 5, dtype=torch.float64)
    ours = torch.autograd.grad(OP(*leaves), [t for t in leaves if t.requires_grad], g)
    theirs = torch.autograd.grad(reference.gated_linear(*refs),
                                 [t for t in refs if t.requires_grad], g)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_tier(dtype, bias, device):
    """fp32 against float64 (tight); bf16 / fp16 within 3x HF's formula's own error (G3)."""
    base = make((2, 40), 96, 64, dtype, device, bias=bias)
    g = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(3))

    def grads(fn, ts, gdt):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in ts]
        out = fn(*leaves)
        return torch.autograd.grad(out, [t for t in leaves if t is not None],
                                   g.to(device=out.device, dtype=gdt))

    ref = grads(reference.gated_linear, [None if t is None else t.double().cpu() for t in base],
                torch.float64)
    ours = grads(OP, base, dtype)
    pt = grads(reference.gated_linear, base, dtype)
    for name, o, p, r in zip([n for n, t in zip(NAMES, base, strict=True) if t is not None],
                             ours, pt, ref, strict=True):
        assert_nontrivial(r)
        if dtype == torch.float32:
            assert err(o, r) <= 1e-5 * (1 + r.abs().max().item()), name
        else:
            assert err(o, r) <= 3 * err(p, r) + 1e-6 * (1 + r.abs().max().item()), name


# --- opcheck, compile, unwritten outputs --------------------------------------------------------


def opcheck_samples(device):
    samples = [make((3,), 8, 4, device=device), make((2, 5), 7, 3, device=device, bias=False),
               make((0,), 6, 5, device=device), make((4, 2), 9, 6, device=device, layout="sliced"),
               make((3,), 5, 7, device=device, layout="transposed", gate_shape=())]
    out = []
    for i, s in enumerate(samples):
        grad = i % 2 == 0
        out.append([t.requires_grad_(grad) if t is not None else None for t in s])
    return out


def test_opcheck(device):
    for args in opcheck_samples(device):
        torch.library.opcheck(OP, tuple(args))


def test_compile_fullgraph_forward_backward(device):
    backend = "inductor" if device == "cuda" else "aot_eager"
    counter = CompileCounterWithBackend(backend)

    def layer(x, w, gate, residual):
        return vlmkern.ops.gated_linear(x, w, gate, residual).square().sum()

    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    for m in (3, 5, 8, 13):
        args = make((m,), 16, 8, device=device, bias=False)
        leaves = [t.requires_grad_() for t in args[:4]]
        grads = torch.autograd.grad(compiled(*leaves), leaves)
        expect = torch.autograd.grad(layer(*leaves), leaves)
        for a, b in zip(grads, expect, strict=True):
            torch.testing.assert_close(a, b)
    assert counter.frame_count <= 2


def test_no_unwritten_output(device):
    """G7: deterministic mode NaN-fills fresh buffers; every output element must be written."""
    with deterministic_mode():
        out = OP(*make((37,), 20, 12, device=device))
    assert not out.isnan().any()


# --- bad inputs (real and fake tensors) ---------------------------------------------------------


def bad_cases():
    x, w, gate, r, b = make((4,), 6, 5)
    return {
        "0-D x": ((torch.tensor(1.0), w, gate, r, b), "x must have at least 1 dimension"),
        "int x": ((x.int(), w, gate, r, b), "x must be float32"),
        "1-D weight": ((x, w[0], gate, r, b), "weight must be a 2-D tensor"),
        "weight K": ((x, w[:, :5], gate, r, b), r"weight \(N, K\) = .* does not match x's last"),
        "weight dtype": ((x, w.double(), gate, r, b), "weight has dtype"),
        "gate size": ((x, w, torch.zeros(2), r, b), "gate must hold one value"),
        "int gate": ((x, w, torch.zeros(1, dtype=torch.int32), r, b),
                     "gate must be a floating-point tensor"),
        "residual shape": ((x, w, gate, r[:, :4], b), "residual must have the output's shape"),
        "residual dtype": ((x, w, gate, r.half(), b), "residual has dtype"),
        "bias rank": ((x, w, gate, r, b[None]), "bias must be a 1-D tensor"),
        "bias size": ((x, w, gate, r, b[:4]), "bias has 4 elements but weight has N=5"),
        "bias dtype": ((x, w, gate, r, b.half()), "bias has dtype"),
    }


@pytest.mark.parametrize("name", list(bad_cases()))
def test_bad_input_raises(name):
    args, msg = bad_cases()[name]
    with pytest.raises(RuntimeError, match=msg):
        OP(*args)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=msg):
        OP(*[None if t is None else mode.from_tensor(t) for t in args])


@pytest.mark.gpu
def test_mixed_devices_raise():
    x, w, gate, r, b = make((4,), 6, 5, device="cuda")
    with pytest.raises(RuntimeError, match="gate is on cpu but x is on cuda"):
        OP(x, w, gate.cpu(), r, b)
    with pytest.raises(RuntimeError, match="residual is on cpu but x is on cuda"):
        OP(x, w, gate, r.cpu(), b)


# --- G12 fuzz -----------------------------------------------------------------------------------


@settings(derandomize=True, max_examples=60, deadline=None, database=None)
@given(lead=st.lists(st.integers(0, 9), min_size=1, max_size=3), k=st.integers(0, 40),
       n=st.integers(1, 40), layout=st.sampled_from(["contiguous", "sliced", "transposed"]),
       bias=st.booleans(), gate=st.floats(-3, 3), dtype=st.sampled_from(FLOATS))
def test_fuzz(lead, k, n, layout, bias, gate, dtype):
    args = make(tuple(lead), k, n, dtype, bias=bias, gate=gate, layout=layout)
    out, ref = OP(*args), ref64(args)
    assert out.shape == ref.shape
    if dtype == torch.float32:
        assert err(out, ref) <= 1e-5 * (1 + ref.abs().max().item() if ref.numel() else 1)
    else:
        pt = reference.gated_linear(*args)
        assert err(out, ref) <= 2 * err(pt, ref) + 1e-3 * (1 + ref.abs().max().item()
                                                              if ref.numel() else 1)


# --- CUDA: the fused path -----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_runs_one_fused_gemm(dtype, bias, monkeypatch):
    """The lt path calls neither aten::mm nor aten::addcmul for the gate / residual (the
    VLMKERN_GATED_LINEAR=aten composite does: the check can fail), and matches it."""
    if not vlmkern.info()["cublaslt"]:
        pytest.skip("built without cuBLASLt: the CUDA op is the ATen composite")
    args = make((2, 96), 256, 128, dtype, "cuda", bias=bias)
    names = profiled_names(lambda: OP(*args))
    assert "aten::mm" not in names and "aten::addmm" not in names
    assert ("aten::addcmul" in names) == bias  # only the bias joins the residual first
    fused = OP(*args)
    monkeypatch.setenv("VLMKERN_GATED_LINEAR", "aten")
    composite = OP(*args)
    assert profiled_names(lambda: OP(*args)) & {"aten::mm", "aten::addmm"}
    ref = ref64(args)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert err(fused, ref) <= tol * (1 + ref.abs().max().item())
    assert err(composite, ref) <= tol * (1 + ref.abs().max().item())


@pytest.mark.gpu
def test_cuda_graph_capture_and_stream():
    """G11: no host read of the gate: capture, change the gate in place, replay."""
    x, w, gate, r, _ = make((64,), 128, 64, torch.bfloat16, "cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        eager = OP(x, w, gate, r)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OP(x, w, gate, r)
    graph.replay()
    assert torch.equal(out, eager)
    gate.fill_(-1.5)
    graph.replay()
    assert torch.equal(out, OP(x, w, gate, r))
    assert not torch.equal(out, eager)


@pytest.mark.gpu
def test_cuda_deterministic_20_runs():
    args = make((3, 200), 512, 384, torch.bfloat16, "cuda")
    first = OP(*args)
    for _ in range(20):
        assert torch.equal(OP(*args), first)


def test_info_reports_cublaslt():
    info = vlmkern.info()
    assert isinstance(info["cublaslt"], bool)
    assert not info["cublaslt"] or info["cuda_kernels"]
    assert "cuBLASLt" in vlmkern._build_info.format_info(info)
