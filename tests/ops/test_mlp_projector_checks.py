"""mlp_projector autograd (gradcheck in fp64, fp32 and bf16/fp16 gradient tiers, only the asked-for
gradients computed), opcheck of both ops, torch.compile, unwritten-output detection (G7), and bad
inputs on real, meta and fake tensors. Forward numerics: test_mlp_projector.py."""

import pytest
import torch
from projector_testing import (
    MODES,
    OURS,
    REF,
    assert_lowprec_tier,
    cast,
    fp32_rel_err,
    grads_of,
    make_weights,
    make_x,
    options,
    run,
)
from testing_utils import assert_nontrivial, deterministic_mode
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

op = torch.ops.vlmkern.mlp_projector
backward_op = torch.ops.vlmkern.mlp_projector_backward


def _inputs(name, rows, layout="cls", dtype=torch.float32, c=5, n1=7, d=6):
    mode = MODES[name]
    x, grid = make_x(mode, rows, c, layout)
    x, weights = cast(x, make_weights(mode, c, n1, d), dtype)
    return x, weights, options(mode, grid)


# --- G2 and the gradient tiers ---------------------------------------------------------------


@pytest.mark.parametrize("name", MODES)
def test_gradcheck(name):
    x, weights, opts = _inputs(name, 3, dtype=torch.float64, c=3, n1=5, d=4)
    present = [n for n, t in weights.items() if t is not None]

    def fn(x, *params):
        return run(OURS, x, {**weights, **dict(zip(present, params, strict=True))}, opts)

    leaves = [x.detach().requires_grad_()]
    leaves += [weights[n].detach().requires_grad_() for n in present]
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("name", MODES)
def test_fp32_gradients_match_fp64(name):
    x, weights, opts = _inputs(name, 113, c=37, n1=93, d=45)
    _, grads = grads_of(OURS, x, weights, opts)
    x64, w64 = cast(x, weights, torch.float64)
    _, ref = grads_of(REF, x64, w64, opts)
    for n, g in grads.items():
        assert_nontrivial(ref[n])
        assert fp32_rel_err(g, ref[n]) <= 2e-5, n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", MODES)
def test_lowprec_gradients_within_3x_of_pytorch(name, dtype):
    x, weights, opts = _inputs(name, 113, dtype=dtype, c=37, n1=93, d=45)
    _, grads = grads_of(OURS, x, weights, opts)
    _, pt = grads_of(REF, x, weights, opts)
    x64, w64 = cast(x, weights, torch.float64)
    _, ref = grads_of(REF, x64, w64, opts)
    for n, g in grads.items():
        assert g.dtype == dtype
        assert_lowprec_tier(g, pt[n], ref[n], factor_=3.0, what=n)


def test_saved_activation_is_gemm2_input_and_optional():
    """The forward keeps GEMM2's input act(hidden) for dw2 (as eager autograd does); the backward
    takes it or, given an empty one, recomputes it with the same result; a wrong shape raises;
    without an activation (or a second Linear) nothing extra is kept."""
    x, weights, _ = _inputs("internvl", 4, "contiguous")
    mode = ("gelu", "layernorm", "post", 1e-5, 2, 0)
    out, hidden, act, mean, rstd = op(x, *weights.values(), *mode)
    assert torch.equal(act, torch.nn.functional.gelu(hidden))
    g = torch.randn_like(out)
    head = (g, x, weights["w1"], weights["w2"], weights["norm_weight"], weights["norm_bias"],
            hidden)
    saved = backward_op(*head, act, mean, rstd, *mode, [True] * 7)
    recomputed = backward_op(*head, act.new_empty(0), mean, rstd, *mode, [True] * 7)
    for a, b in zip(saved, recomputed, strict=True):
        assert torch.equal(a, b)
    for dev in ("cpu", "meta"):  # the fake kernel raises the same
        moved = [t.to(dev) if t is not None else None for t in (*head, act[:, :3], mean, rstd)]
        with pytest.raises(RuntimeError, match=r"act must have shape \[4, 7\]"):
            backward_op(*moved, *mode, [True] * 7)
    x, weights, _ = _inputs("no_act_two_linears", 4, "contiguous")
    assert op(x, *weights.values(), "none", "layernorm", "pre", 1e-5, 0, 0)[2].numel() == 0


def test_only_requested_gradients_are_computed():
    x, weights, opts = _inputs("internvl", 4, "contiguous")
    out, hidden, act, mean, rstd = op(x, *weights.values(), "gelu", "layernorm", "post", 1e-5, 2,
                                      0)
    g = torch.randn_like(out)
    args = (g, x, weights["w1"], weights["w2"], weights["norm_weight"], weights["norm_bias"],
            hidden, act, mean, rstd, "gelu", "layernorm", "post", 1e-5, 2, 0)  # fmt: skip
    grads = backward_op(*args, [True, False, False, True, False, False, True])
    assert [t is not None for t in grads] == [True, False, False, True, False, False, True]
    everything = backward_op(*args, [True] * 7)
    for i in (0, 3, 6):
        assert torch.equal(grads[i], everything[i])
    leaf = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(run(OURS, leaf, weights, options(MODES["internvl"])), leaf, g)
    assert torch.allclose(gx, everything[0])


def test_double_backward_is_refused_clearly():
    x, weights, opts = _inputs("llava", 4, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(run(OURS, leaf, weights, opts).sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match=r"vlmkern.mlp_projector: double backward"):
        gx.sum().backward()


# --- G1: opcheck --------------------------------------------------------------------------------

# (mode, rows, layout, requires_grad): empty M, non-contiguous x, every option kind.
OPCHECK_SAMPLES = [
    ("internvl", 3, "contiguous", False),
    ("internvl", 3, "transposed", True),
    ("llava", 0, "contiguous", True),
    ("llava", 0, "contiguous", False),
    ("qwen2_5_vl", 4, "cls", True),
    ("qwen3_vl_postshuffle", 2, "strided", False),
    ("idefics3", 2, "cls", True),
    ("paligemma", 5, "strided", True),
]


def _raw_args(name, rows, layout, requires_grad):
    mode = MODES[name]
    x, grid = make_x(mode, rows, 5, layout)
    if grid is not None:
        x = x.unflatten(1, grid)
    w = make_weights(mode, 5, 7, 6)
    tensors = [t.detach().requires_grad_(requires_grad) if t is not None else None
               for t in (x, *w.values())]  # fmt: skip
    opts = (mode.activation, mode.norm or "none", mode.norm_position, mode.eps,
            mode.shuffle or 0, mode.merge or 0)  # fmt: skip
    return tensors, opts


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=str)
def test_opcheck_forward(sample):
    tensors, opts = _raw_args(*sample)
    torch.library.opcheck(op.default, (*tensors, *opts))


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=str)
def test_opcheck_backward(sample):
    """All four utilities without grad; with grad inputs, test_aot_dispatch_dynamic would take
    the backward of the backward, which is refused (test_double_backward_is_refused_clearly)."""
    name, rows, layout, requires_grad = sample
    tensors, opts = _raw_args(name, rows, layout, False)
    x, w1, b1, w2, b2, nw, nb = tensors
    out, hidden, act, mean, rstd = op(*tensors, *opts)
    g = torch.randn_like(out).requires_grad_(requires_grad)
    mask = [t is not None for t in tensors]
    args = (g, x, w1, w2, nw, nb, hidden, act, mean, rstd, *opts, mask)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not requires_grad:
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(backward_op.default, args, test_utils=utils)


# --- G11: torch.compile ---------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _connectors(feats, qwen_tokens, p):
    """InternVL (CLS dropped, grid path) and a Qwen2.5-VL merger in one graph."""
    a = OURS(feats[:, 1:], p["w1"], p["b1"], p["w2"], p["b2"], norm="layernorm",
             norm_weight=p["nw"], norm_bias=p["nb"], norm_position="post", shuffle=2, grid=(4, 6))
    b = OURS(qwen_tokens, p["q1"], None, p["q2"], None, norm="rmsnorm", norm_weight=p["qn"],
             eps=1e-6, merge=2)  # fmt: skip
    return a * 2, b


@pytest.mark.parametrize(
    ("dev", "backend"),
    [("cpu", "aot_eager"), pytest.param("cuda", "inductor", marks=pytest.mark.gpu)],
)
def test_torch_compile(dev, backend, fresh_dynamo):
    c = 3
    p = {"w1": torch.randn(8, 4 * c), "b1": torch.randn(8), "w2": torch.randn(5, 8),
         "b2": torch.randn(5), "nw": torch.randn(4 * c), "nb": torch.randn(4 * c),
         "q1": torch.randn(8, 4 * c), "q2": torch.randn(5, 8), "qn": torch.randn(c)}  # fmt: skip
    p = {n: t.to(dev).requires_grad_() for n, t in p.items()}
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(_connectors, backend=counter, fullgraph=True)
    for batch in (1, 2, 3, 4):
        feats = torch.randn(batch, 1 + 24, c, device=dev)
        tokens = torch.randn(4 * 3 * batch, c, device=dev)
        fe, fc = feats.clone().requires_grad_(), feats.clone().requires_grad_()
        outs_e, outs_c = _connectors(fe, tokens, p), compiled(fc, tokens, p)
        weights = [torch.randn_like(o) for o in outs_e]
        for e, comp in zip(outs_e, outs_c, strict=True):
            torch.testing.assert_close(comp, e)
        loss = [sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
                for outs in (outs_e, outs_c)]  # fmt: skip
        ge = torch.autograd.grad(loss[0], [fe, *p.values()])
        gc = torch.autograd.grad(loss[1], [fc, *p.values()])
        assert_nontrivial(ge[0])
        for e, comp in zip(ge, gc, strict=True):
            torch.testing.assert_close(comp, e)
    assert 1 <= counter.frame_count <= 2
    targets = {str(n.target) for g in counter.graphs for n in g.graph.nodes}
    assert "vlmkern.mlp_projector.default" in targets or "vlmkern.mlp_projector" in targets


# --- G7: every output element written ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", MODES)
def test_every_output_element_is_written(name, dtype):
    x, weights, opts = _inputs(name, 9, dtype=dtype)
    with deterministic_mode():
        assert torch.empty(4).isnan().all()  # fresh buffers are poisoned
        out, grads = grads_of(OURS, x, weights, opts)
    assert not out.isnan().any()
    for n, g in grads.items():
        assert not g.isnan().any(), n
    torch.testing.assert_close(out, run(OURS, x, weights, opts))


# --- G5: bad inputs; real, meta and fake kernels and the wrapper raise the same errors ----------

ERROR_DEVICES = ["cpu", "meta", "fake", pytest.param("cuda", marks=pytest.mark.gpu)]
_F32, _BF16, _F64, _I32 = torch.float32, torch.bfloat16, torch.float64, torch.int32
# The raw op's valid base call: InternVL-like, x (2, 4, 4, 3), r = 2, K = 12, N1 = 8, D = 5.
_BASE = {"x": ((2, 4, 4, 3), _F32), "w1": ((8, 12), _F32), "b1": ((8,), _F32),
         "w2": ((5, 8), _F32), "b2": ((5,), _F32), "nw": ((12,), _F32), "nb": ((12,), _F32),
         "activation": "gelu", "norm": "layernorm", "position": "post", "eps": 1e-5,
         "shuffle": 2, "merge": 0}  # fmt: skip
_PLAIN = {"shuffle": 0, "position": "pre"}
OP_ERRORS = {  # id: (overrides of _BASE, message)
    "activation": ({"activation": "relu"}, r"activation must be one of .*got 'relu'"),
    "norm-string": ({"norm": "batchnorm"}, r"norm must be one of .*got 'batchnorm'"),
    "norm-position": ({"position": "mid"}, r"norm_position must be 'pre' or 'post'; got 'mid'"),
    "eps": ({"eps": -1.0}, r"eps must be a finite number >= 0"),
    "shuffle-negative": ({"shuffle": -2}, r"shuffle must be in \[0, \d+\], got -2"),
    "shuffle-and-merge": ({"merge": 2}, r"shuffle=2 and merge=2 cannot both be > 1"),
    "x-int": ({"x": ((2, 4, 4, 3), _I32)}, r"x must be a floating-point tensor .*got Int"),
    "w1-1d": ({"w1": ((96,), _F32)}, r"w1 must be a 2-D tensor \(N1, K\)"),
    "w1-dtype": ({"w1": ((8, 12), _BF16)}, r"w1 has dtype BFloat16 but x has Float"),
    "w1-k0": ({"w1": ((8, 0), _F32)}, r"w1 must have at least one input feature"),
    "w1-k": ({"w1": ((8, 10), _F32)}, r"x channels C=3 times shuffle\*shuffle=4 must equal K=10"),
    "b1-shape": ({"b1": ((7,), _F32)}, r"b1 must have shape \(8,\)"),
    "b1-dtype": ({"b1": ((8,), _F64)}, r"b1 has dtype Double but x has Float"),
    "w2-1d": ({"w2": ((40,), _F32)}, r"w2 must be a 2-D tensor \(D, N1\)"),
    "w2-n1": ({"w2": ((5, 7), _F32)}, r"w2 must have shape \(D, N1\) with N1 = 8"),
    "b2-shape": ({"b2": ((4,), _F32)}, r"b2 must have shape \(5,\)"),
    "b2-without-w2": ({"w2": None}, r"b2 is given but w2 is None"),
    "x-3d": ({"x": ((2, 16, 3), _F32)}, r"x must be a 4-D tensor \(B, H, W, C\) when shuffle"),
    "x-height": ({"x": ((2, 5, 4, 3), _F32)}, r"x height H=5 is not divisible by shuffle=2"),
    "x-width": ({"x": ((2, 4, 7, 3), _F32)}, r"x width W=7 is not divisible by shuffle=2"),
    "merge-tokens": ({"x": ((5, 3), _F32), "shuffle": 0, "merge": 2},
                     r"x has 5 tokens, not divisible by merge\*merge=4"),
    "merge-k": ({"x": ((8, 4), _F32), "shuffle": 0, "merge": 2},
                r"x channels C=4 times merge\*merge=4 must equal K=12"),
    "plain-k": ({"x": ((6, 11), _F32), **_PLAIN}, r"x has 11 features \(last dim\) but w1 has K"),
    "norm-weight-missing": ({"nw": None}, r"norm='layernorm' needs norm_weight"),
    "rms-weight-missing": ({"nw": None, "nb": None, "norm": "rmsnorm"},
                           r"norm='rmsnorm' needs norm_weight"),
    "norm-weight-post": ({"nw": ((3,), _F32)}, r"norm_weight must have shape \(12,\) \(the K"),
    "norm-weight-pre": ({"position": "pre"}, r"norm_weight must have shape \(3,\) \(the C"),
    "norm-weight-dtype": ({"nw": ((12,), _F64)}, r"norm_weight has dtype Double but x has Float"),
    "norm-bias-shape": ({"nb": ((11,), _F32)}, r"norm_bias must have shape \(12,\)"),
    "norm-bias-rms": ({"norm": "rmsnorm"}, r"norm_bias is given but norm='rmsnorm' has no bias"),
    "norm-weight-none": ({"norm": "none"}, r"norm_weight is given but norm='none'"),
    "norm-bias-none": ({"norm": "none", "nw": None}, r"norm_bias is given but norm='none'"),
}  # fmt: skip


def _make(spec, dev, mode):
    if spec is None:
        return None
    t = torch.zeros(spec[0], dtype=spec[1], device="cpu" if dev == "fake" else dev)
    return mode.from_tensor(t) if mode is not None else t


def _call_op(overrides, dev):
    a = {**_BASE, **overrides}
    mode = FakeTensorMode() if dev == "fake" else None
    tensors = [_make(a[n], dev, mode) for n in ("x", "w1", "b1", "w2", "b2", "nw", "nb")]
    return op(*tensors, a["activation"], a["norm"], a["position"], a["eps"], a["shuffle"],
              a["merge"])  # fmt: skip


def test_base_call_is_valid():
    assert _call_op({}, "cpu")[0].shape == (2, 2, 2, 5)


@pytest.mark.parametrize("dev", ERROR_DEVICES)
@pytest.mark.parametrize("case", OP_ERRORS)
def test_op_rejects_bad_input(case, dev):
    overrides, match = OP_ERRORS[case]
    with pytest.raises(RuntimeError, match=rf"^vlmkern\.mlp_projector: {match}"):
        _call_op(overrides, dev)


@pytest.mark.parametrize("dev", ["cpu", "meta"])
def test_op_rejects_mixed_devices(dev):
    other = "meta" if dev == "cpu" else "cpu"
    x, w1 = torch.zeros(6, 12, device=dev), torch.zeros(8, 12, device=other)
    with pytest.raises(RuntimeError, match=rf"w1 is on {other} but x is on {dev}"):
        op(x, w1, None, None, None, None, None, "gelu", "none", "pre", 1e-5, 0, 0)


WRAPPER_ERRORS = {  # id: (x shape, keyword arguments, message)
    "activation": ((6, 12), {"activation": "relu"}, r"activation must be one of .*got 'relu'"),
    "norm": ((6, 12), {"norm": "bn"}, r"norm must be one of .*got 'bn'"),
    "norm-position": ((6, 12), {"norm_position": "mid"}, r"norm_position must be one of"),
    "shuffle-negative": ((2, 4, 4, 3), {"shuffle": -1}, r"shuffle must be None or an int >= 0"),
    "shuffle-float": ((2, 4, 4, 3), {"shuffle": 2.0}, r"shuffle must be None or an int >= 0"),
    "merge-bool": ((8, 3), {"merge": True}, r"merge must be None or an int >= 0"),
    "grid-without-shuffle": ((2, 16, 12), {"grid": (4, 4)}, r"grid=\(4, 4\) is only used with"),
    "grid-ndiv": ((2, 20, 3), {"shuffle": 2, "grid": (5, 4)},
                  r"grid \(5, 4\) is not divisible by shuffle=2"),
    "grid-tokens": ((2, 15, 3), {"shuffle": 2, "grid": (4, 4)}, r"x has N=15 tokens.*needs 16"),
    "grid-sides": ((2, 16, 3), {"shuffle": 2, "grid": (16,)}, r"grid must be two positive ints"),
    "x-3d-no-grid": ((2, 16, 3), {"shuffle": 2}, r"x is 3-D \(B, N, C\) with shuffle=2; pass grid"),
}  # fmt: skip


@pytest.mark.parametrize("dev", ["cpu", "meta"])
@pytest.mark.parametrize("case", WRAPPER_ERRORS)
def test_wrapper_rejects_bad_input(case, dev):
    shape, kwargs, match = WRAPPER_ERRORS[case]
    x, w1 = torch.zeros(shape, device=dev), torch.zeros(8, 12, device=dev)
    with pytest.raises(ValueError, match=rf"^vlmkern\.mlp_projector: {match}"):
        OURS(x, w1, **kwargs)


def test_backward_rejects_mismatched_grad():
    tensors, opts = _raw_args("llava", 4, "contiguous", False)
    x, w1, _, w2, _, nw, nb = tensors
    out, hidden, act, mean, rstd = op(*tensors, *opts)
    for dev in ("cpu", "meta"):
        args = [t.to(dev) if t is not None else None
                for t in (out[:, :3], x, w1, w2, nw, nb, hidden, act, mean, rstd)]  # fmt: skip
        with pytest.raises(RuntimeError, match=r"grad_out must have the output's shape"):
            backward_op(*args, *opts, [True] * 7)


SAVED_ERRORS = {  # id: (which of the backward's inputs is replaced, by what, message)
    "grad-out-dtype": ("g", lambda t: t.double(), r"grad_out has dtype Double but x has Float"),
    "hidden-shape": ("hidden", lambda t: t[:, :3], r"hidden must have shape \[4, 7\], got \[4, 3"),
    "hidden-dtype": ("hidden", lambda t: t.double(), r"hidden has dtype Double but x has Float"),
    "act-dtype": ("act", lambda t: t.double(), r"act has dtype Double but x has Float"),
    "mean-shape": ("mean", lambda t: t[:3], r"mean must have shape \[4, 1\], got \[3, 1\]"),
    "rstd-dtype": ("rstd", lambda t: t.double(), r"rstd must be Float on .*, got Double"),
}  # fmt: skip


@pytest.mark.parametrize("dev", ["cpu", "meta"])
@pytest.mark.parametrize("case", SAVED_ERRORS)
def test_backward_rejects_bad_saved_tensors(case, dev):
    """check_projector_saved: the real and the fake backward raise the same errors."""
    x, weights, _ = _inputs("internvl", 4, "contiguous")
    mode = ("gelu", "layernorm", "post", 1e-5, 2, 0)
    out, hidden, act, mean, rstd = op(x, *weights.values(), *mode)
    saved = {"g": torch.randn_like(out), "hidden": hidden, "act": act, "mean": mean, "rstd": rstd}
    which, bad, match = SAVED_ERRORS[case]
    saved[which] = bad(saved[which])
    args = (saved["g"], x, weights["w1"], weights["w2"], weights["norm_weight"],
            weights["norm_bias"], saved["hidden"], saved["act"], saved["mean"], saved["rstd"])
    moved = [t.to(dev) for t in args]
    with pytest.raises(RuntimeError, match=rf"^vlmkern\.mlp_projector_backward: {match}"):
        backward_op(*moved, *mode, [True] * 7)
