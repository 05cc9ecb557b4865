"""RoPE autograd (backward = rotation by -angle, gradcheck/gradgradcheck), opcheck of rope,
rope_backward and rope_, torch.compile, CUDA graph capture / streams / repeatability (skipped
without a GPU), unwritten-output detection (G7), and bad inputs on real, meta and fake tensors for
the raw ops and the wrappers. Forward numerics live in test_rope.py."""

import pytest
import torch
from test_rope import (
    KIND_LAYOUTS,
    apply,
    assert_g3,
    check,
    check_kind,
    make_positions,
    make_qk,
    qwen_text_positions,
)
from testing_utils import FLOATS, assert_bit_equal, assert_nontrivial, deterministic_mode
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import vlmkern
from vlmkern import reference
from vlmkern.ops.rope import mrope_table, rope_table, vision_rope_table

rope_op = torch.ops.vlmkern.rope
rope_backward_op = torch.ops.vlmkern.rope_backward
rope_inplace_op = torch.ops.vlmkern.rope_

# --- autograd -------------------------------------------------------------------------------------


def _grads(mod, kind, q, k, pos, layout, gq, gk, **kw):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    out = apply(mod, kind, q, k, pos, layout, **kw)
    return torch.autograd.grad(out, (q, k), (gq, gk))


@pytest.mark.parametrize("dtype", [*FLOATS, torch.float64], ids=str)
@pytest.mark.parametrize(("kind", "layout"), KIND_LAYOUTS)
def test_backward_is_rotation_by_minus_angle(kind, layout, dtype, device):
    kw = {} if kind == "vision" else {"rotary_dim": 48, "scale": 0.5}
    D = 72 if kind == "vision" else 64
    q, k = make_qk(layout, "fused", 2, 9, 5, 3, D, dtype, device)
    pos = make_positions(kind, layout, 2, 9, 4000, device=device)
    gq, gk = make_qk(layout, "strided_d", 2, 9, 5, 3, D, dtype, device)
    grads = _grads(vlmkern.ops, kind, q, k, pos, layout, gq, gk, **kw)
    # float(-p) = -float(p) and sin is odd: the forward at -positions is the same rotation
    for g, e in zip(grads, apply(vlmkern.ops, kind, gq, gk, -pos, layout, **kw), strict=True):
        assert_bit_equal(g, e)
    qc, kc, gqc, gkc, pc = (t.cpu() for t in (q, k, gq, gk, pos))
    ref = _grads(reference, kind, qc.double(), kc.double(), pc, layout, gqc.double(),
                 gkc.double(), **kw)
    pt = _grads(reference, kind, qc, kc, pc, layout, gqc, gkc, compute_dtype=None, **kw)
    for g, r, p in zip(grads, ref, pt, strict=True):
        assert_nontrivial(r)
        check(g, r)
        if dtype in (torch.float16, torch.bfloat16):
            assert_g3(g, r, p, factor=3.0)


def test_backward_of_sum_and_of_q_alone(device):
    """Expanded (stride-0) incoming gradients, and k not requiring grad."""
    q, k = make_qk("bhsd", "contiguous", 2, 6, 4, 2, 64, torch.float32, device)
    q.requires_grad_()
    pos = make_positions("mrope", "bhsd", 2, 6, 3000, device=device)
    out_q, _ = vlmkern.ops.mrope(q, k, pos, [8, 12, 12])
    out_q.sum().backward()
    ones = torch.ones_like(q)
    expected, _ = vlmkern.ops.mrope(ones, torch.ones_like(k), -pos, [8, 12, 12])
    assert_nontrivial(q.grad)
    assert_bit_equal(q.grad, expected)


GRAD_CASES = {  # id: (q shape, k shape, positions shape, fn(q, k, positions))
    "rope-bhsd": ((1, 2, 3, 8), (1, 1, 3, 8), (1, 3), lambda q, k, p: vlmkern.ops.rope(q, k, p)),
    "rope-partial-bshd": ((2, 3, 2, 12), (2, 3, 1, 12), (2, 3),
                          lambda q, k, p: vlmkern.ops.rope(q, k, p, rotary_dim=8, layout="bshd")),
    "rope-packed-scaled": ((5, 2, 8), (5, 1, 8), (5,),
                           lambda q, k, p: vlmkern.ops.rope(q, k, p, scale=0.5)),
    "mrope-sectioned": ((1, 2, 4, 12), (1, 1, 4, 12), (3, 1, 4),
                        lambda q, k, p: vlmkern.ops.mrope(q, k, p, [2, 2, 2])),
    "mrope-interleaved": ((2, 1, 3, 16), (2, 1, 3, 16), (3, 2, 3),
                          lambda q, k, p: vlmkern.ops.mrope(q, k, p, [4, 2, 2], interleaved=True)),
    "mrope-partial-packed": ((4, 2, 16), (4, 1, 16), (3, 4),
                             lambda q, k, p: vlmkern.ops.mrope(q, k, p, [2, 1, 1], rotary_dim=8)),
    "vision": ((6, 2, 8), (6, 2, 8), (6, 2), lambda q, k, p: vlmkern.ops.vision_rope(q, k, p)),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck(case):
    q_shape, k_shape, pos_shape, fn = GRAD_CASES[case]
    q = torch.randn(q_shape, dtype=torch.float64, requires_grad=True)
    k = torch.randn(k_shape, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(0, 3000, pos_shape)
    assert torch.autograd.gradcheck(lambda q, k: fn(q, k, pos), (q, k))
    assert torch.autograd.gradgradcheck(lambda q, k: fn(q, k, pos), (q, k))


# --- opcheck --------------------------------------------------------------------------------------


def _op_sample(name, requires_grad):
    """Raw-op args (q, k, positions (A, B, S), inv_freq, freq_axis, scale), q/k (B, S, H, D)."""
    if name == "contiguous-rope":
        q, k = make_qk("bshd", "contiguous", 2, 5, 3, 1, 16, torch.float32)
        pos, table, scale = torch.randint(0, 4000, (1, 2, 5)), rope_table(16, 1e4), 1.0
    elif name in ("empty-batch", "empty-seq"):
        B, S = (0, 5) if name == "empty-batch" else (2, 0)
        q, k = make_qk("bshd", "contiguous", B, S, 3, 1, 16, torch.float32)
        pos, table, scale = torch.zeros(3, B, S, dtype=torch.int64), mrope_table((2, 3, 3), 1e6,
                                                                                  False, 16), 1.0
    elif name == "fused-mrope-int32":
        q, k = make_qk("bshd", "fused", 2, 5, 4, 2, 32, torch.float32)
        pos = torch.randint(0, 4000, (3, 2, 5), dtype=torch.int32)
        table, scale = mrope_table((4, 6, 6), 1e6, False, 32), 1.0
    elif name == "transposed-partial-interleaved":
        q, k = make_qk("bshd", "transposed", 2, 6, 3, 3, 32, torch.float32)
        pos, table = torch.randint(0, 4000, (3, 2, 6)), mrope_table((4, 2, 2), 1e6, True, 16)
        scale = 0.5
    elif name == "strided-vision":
        q, k = make_qk("bshd", "strided_d", 1, 7, 2, 2, 16, torch.float32)
        pos = torch.randint(0, 60, (7, 2)).t().unsqueeze(1)  # (2, 1, N), non-contiguous
        table, scale = vision_rope_table(16, 1e4), 1.0
    else:
        raise AssertionError(name)
    return (q.detach().requires_grad_(requires_grad), k.detach().requires_grad_(requires_grad),
            pos, list(table[0]), list(table[1]), scale)


OP_SAMPLES = ["contiguous-rope", "empty-batch", "empty-seq", "fused-mrope-int32",
              "transposed-partial-interleaved", "strided-vision"]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("sample", OP_SAMPLES)
@pytest.mark.parametrize("op", [rope_op, rope_backward_op], ids=["rope", "rope_backward"])
def test_opcheck(op, sample, requires_grad):
    torch.library.opcheck(op.default, _op_sample(sample, requires_grad))


@pytest.mark.parametrize("sample", OP_SAMPLES)
def test_opcheck_inplace(sample):
    torch.library.opcheck(rope_inplace_op.default, _op_sample(sample, False))


@pytest.mark.parametrize("sample", OP_SAMPLES)
def test_inplace_refuses_inputs_that_require_grad(sample):
    q, k, *rest = _op_sample(sample, True)
    with pytest.raises(RuntimeError, match=r"rope_: the in-place RoPE is not differentiable"):
        rope_inplace_op(q * 1, k * 1, *rest)
    with torch.no_grad():  # fine without grad mode
        rope_inplace_op(q * 1, k * 1, *rest)


def test_inplace_bumps_version_counter():
    q, k, *rest = _op_sample("contiguous-rope", False)
    versions = (q._version, k._version)
    rope_inplace_op(q, k, *rest)
    assert q._version > versions[0] and k._version > versions[1]


def test_inplace_on_tensor_requiring_grad_is_not_silent():
    base = torch.randn(1, 2, 3, 8, requires_grad=True)
    pos = torch.arange(3).view(1, 3) + 100
    x = base * 1
    try:
        vlmkern.ops.mrope_(x, torch.randn(1, 1, 3, 8), pos, [2, 1, 1])
    except RuntimeError:
        return  # an error is a fine answer
    x.sum().backward()
    expected, _ = vlmkern.ops.mrope(torch.ones(1, 2, 3, 8), torch.ones(1, 1, 3, 8), -pos, [2, 1, 1])
    assert_bit_equal(base.grad, expected)


def test_inplace_rejects_internally_overlapping_q():
    q = torch.randn(1, 4, 2, 8).expand(2, 4, 2, 8)  # (B, S, H, D), batch stride 0
    k = torch.randn(2, 4, 1, 8)
    pos = torch.tensor([[[0, 1, 2, 3], [100, 101, 102, 103]]])
    inv_freq, axis = rope_table(8, 1e4)
    with pytest.raises(RuntimeError, match=r"q"):
        rope_inplace_op(q, k, pos, list(inv_freq), list(axis), 1.0)


# --- torch.compile --------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _attention_ropes(q, k, pos, vq, vk, vpos):
    """A Qwen-VL-ish block: sectioned and interleaved M-RoPE on the LLM side, 2D RoPE in the ViT,
    and the in-place variant on copies."""
    q1, k1 = vlmkern.ops.mrope(q, k, pos, [2, 3, 3])
    q2, k2 = vlmkern.ops.mrope(q, k, pos, [4, 2, 2], interleaved=True, theta=5e6)
    vq1, vk1 = vlmkern.ops.vision_rope(vq, vk, vpos)
    q3, k3 = q.detach().clone(), k.detach().clone()
    vlmkern.ops.mrope_(q3, k3, pos, [2, 3, 3])
    return q1 * 2 + q2, k1 - k2, vq1, vk1, q3, k3


@pytest.mark.parametrize(
    ("dev", "backend"),
    [("cpu", "aot_eager"), pytest.param("cuda", "inductor", marks=pytest.mark.gpu)],
)
def test_torch_compile(dev, backend, fresh_dynamo):
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(_attention_ropes, backend=counter, fullgraph=True)
    for S in (5, 9, 17, 33):
        q, k = make_qk("bhsd", "fused", 2, S, 4, 2, 16, torch.float32, dev)
        vq, vk = make_qk("packed", "fused", 1, 2 * S, 3, 3, 16, torch.float32, dev)
        pos = make_positions("mrope", "bhsd", 2, S, 4000, device=dev)
        vpos = make_positions("vision", "packed", 1, 2 * S, 64, device=dev)
        leaves_e = [t.detach().clone().requires_grad_() for t in (q, k, vq, vk)]
        leaves_c = [t.detach().clone().requires_grad_() for t in (q, k, vq, vk)]
        outs_e = _attention_ropes(*leaves_e[:2], pos, *leaves_e[2:], vpos)
        outs_c = compiled(*leaves_c[:2], pos, *leaves_c[2:], vpos)
        for e, c in zip(outs_e, outs_c, strict=True):
            assert_nontrivial(e)
            torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
            if backend == "aot_eager":
                assert_bit_equal(c.detach(), e.detach())
        weights = [torch.randn_like(o) for o in outs_e[:4]]
        sum((o * w).sum() for o, w in zip(outs_e[:4], weights, strict=True)).backward()
        sum((o * w).sum() for o, w in zip(outs_c[:4], weights, strict=True)).backward()
        for e, c in zip(leaves_e, leaves_c, strict=True):
            assert_nontrivial(e.grad)
            torch.testing.assert_close(c.grad, e.grad, rtol=1e-6, atol=1e-6)
    assert 1 <= counter.frame_count <= 2
    targets = {str(n.target) for g in counter.graphs for n in g.graph.nodes}
    assert any(t.startswith("vlmkern.rope") for t in targets), targets


# --- CUDA graphs, streams, repeatability (skipped without a GPU) --------------------------------


def _decode_step(q, k, pos, vq, vk, vpos):
    a = vlmkern.ops.mrope(q, k, pos, [16, 24, 24])
    b = vlmkern.ops.mrope(q, k, pos, [24, 20, 20], interleaved=True, theta=5e6)
    c = vlmkern.ops.vision_rope(vq, vk, vpos)
    vlmkern.ops.mrope_(q, k, pos, [16, 24, 24])
    return (*a, *b, *c, q, k)


def _step_inputs():
    q, k = make_qk("bhsd", "fused", 2, 64, 28, 4, 128, torch.bfloat16, "cuda")
    vq, vk = make_qk("packed", "fused", 1, 256, 16, 16, 80, torch.bfloat16, "cuda")
    return (q, k, qwen_text_positions(2, 64, 100).cuda(), vq, vk,
            torch.randint(0, 64, (256, 2), device="cuda"))


@pytest.mark.gpu
def test_cuda_graph_capture_matches_eager():
    static = _step_inputs()
    fresh = _step_inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _decode_step(*[t.clone() for t in static])  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _decode_step(*static)
    for s, f in zip(static, fresh, strict=True):
        s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    expected = _decode_step(*fresh)
    for o, e in zip(outs, expected, strict=True):
        assert_nontrivial(e)
        assert_bit_equal(o, e)


@pytest.mark.gpu
def test_cuda_runs_on_the_current_stream():
    new = _step_inputs()
    inputs = [torch.zeros_like(t) for t in new]
    expected = _decode_step(*[t.clone() for t in new])
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # a kernel on the wrong stream would read zeros
        for t, n in zip(inputs, new, strict=True):
            t.copy_(n)
        outs = _decode_step(*inputs)
    side.synchronize()
    for o, e in zip(outs, expected, strict=True):
        assert_bit_equal(o, e)


@pytest.mark.gpu
def test_cuda_repeated_runs_are_bit_identical():
    inputs = _step_inputs()
    first = _decode_step(*[t.clone() for t in inputs])
    q = inputs[0].detach().clone().requires_grad_()
    out = vlmkern.ops.mrope(q, inputs[1], inputs[2], [16, 24, 24])
    g = torch.randn_like(out[0])
    (grad,) = torch.autograd.grad(out[0], q, g)
    for _ in range(20):
        for o, e in zip(_decode_step(*[t.clone() for t in inputs]), first, strict=True):
            assert_bit_equal(o, e)
        out = vlmkern.ops.mrope(q, inputs[1], inputs[2], [16, 24, 24])
        assert_bit_equal(torch.autograd.grad(out[0], q, g)[0], grad)


@pytest.mark.gpu
def test_cuda_output_is_on_the_input_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q, k = make_qk("bhsd", "fused", 2, 9, 4, 2, 128, torch.bfloat16, "cuda:1")
    pos = make_positions("mrope", "bhsd", 2, 9, 4000, device="cuda:1")
    with torch.cuda.device(0):
        out = apply(vlmkern.ops, "mrope", q, k, pos)
    assert all(o.device == q.device for o in out)
    check_kind("mrope", out, q, k, pos)


# --- every output element written (G7) ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [*FLOATS, torch.float64], ids=str)
@pytest.mark.parametrize(("kind", "layout"), KIND_LAYOUTS)
def test_every_output_element_is_written(kind, layout, dtype, device):
    kw = {} if kind == "vision" else {"rotary_dim": 40}  # partial: the rest is copied too
    D = 72 if kind == "vision" else 64
    q, k = make_qk(layout, "fused", 2, 7, 3, 2, D, dtype, device)
    pos = make_positions(kind, layout, 2, 7, 4000, device=device)
    expected = apply(vlmkern.ops, kind, q, k, pos, layout, **kw)
    grads = _grads(vlmkern.ops, kind, q, k, pos, layout, *expected, **kw)
    with deterministic_mode():
        assert torch.utils.deterministic.fill_uninitialized_memory
        assert torch.empty(4, device=device).isnan().all()  # fresh buffers are poisoned
        out = apply(vlmkern.ops, kind, q, k, pos, layout, **kw)
        back = _grads(vlmkern.ops, kind, q, k, pos, layout, *expected, **kw)
    for o, e in zip((*out, *back), (*expected, *grads), strict=True):
        assert not o.isnan().any()
        assert_bit_equal(o, e)


# --- bad inputs: real, meta and fake kernels raise the same errors -------------------------------

ERROR_DEVICES = ["cpu", "meta", "fake", pytest.param("cuda", marks=pytest.mark.gpu)]
_Q, _K, _P = (2, 5, 3, 16), (2, 5, 1, 16), (1, 2, 5)  # valid shapes; 8 frequencies, 1 axis
_F, _A = [0.5] * 8, [0] * 8
OP_ERRORS = {  # id: (q shape, k shape, positions shape, dtypes (q, k, pos), inv_freq, axis, match)
    "q-3d": ((5, 3, 16), _K, _P, None, _F, _A, r"q must be a 4-D tensor \(B, S, Hq, D\), got 3-D"),
    "k-5d": (_Q, (1, *_K), _P, None, _F, _A, r"k must be a 4-D tensor \(B, S, Hk, D\), got 5-D"),
    "positions-2d": (_Q, _K, (2, 5), None, _F, _A, r"positions must be a 3-D tensor \(A, B, S\)"),
    "q-int": (_Q, _K, _P, (torch.int32, torch.int32, torch.int64), _F, _A,
              r"q must be float32, float16, bfloat16 or float64"),
    "k-dtype": (_Q, _K, _P, (torch.float32, torch.bfloat16, torch.int64), _F, _A,
                r"k dtype .*differs from q dtype"),
    "positions-float": (_Q, _K, _P, (torch.float32, torch.float32, torch.float32), _F, _A,
                        r"positions must be int32 or int64"),
    "k-seq": (_Q, (2, 6, 1, 16), _P, None, _F, _A,
              r"k shape \[2, 6, 1, 16\] does not match q shape \[2, 5, 3, 16\] in B, S or D"),
    "k-head-dim": (_Q, (2, 5, 1, 8), _P, None, _F, _A, r"k shape \[2, 5, 1, 8\] does not match"),
    "positions-shape": (_Q, _K, (1, 2, 4), None, _F, _A,
                        r"positions shape \[1, 2, 4\] must be \(A, 2, 5\) to match q"),
    "positions-no-axes": (_Q, _K, (0, 2, 5), None, _F, _A, r"positions must have 1\.\.127 axes"),
    "inv-freq-empty": (_Q, _K, _P, None, [], [], r"inv_freq must have 1\.\.256 entries, got 0"),
    "inv-freq-too-long": ((1, 1, 1, 1024), (1, 1, 1, 1024), (1, 1, 1), None, [0.5] * 257,
                          [0] * 257, r"inv_freq must have 1\.\.256 entries, got 257"),
    "rotary-dim-over-d": (_Q, _K, _P, None, [0.5] * 9, [0] * 9,
                          r"rotary_dim = 2 \* len\(inv_freq\) = 18 exceeds head dim D=16"),
    "freq-axis-length": (_Q, _K, _P, None, _F, [0] * 3,
                         r"freq_axis has 3 entries but inv_freq has 8"),
    "freq-axis-too-big": (_Q, _K, _P, None, _F, [0] * 7 + [1],
                          r"freq_axis\[7\] = 1 is not a valid axis of positions \(A=1\)"),
    "freq-axis-negative": (_Q, _K, _P, None, _F, [-1] + [0] * 7,
                           r"freq_axis\[0\] = -1 is not a valid axis"),
}
_DEFAULT_DTYPES = (torch.float32, torch.float32, torch.int64)


def _zeros_on(shapes_dtypes, dev):
    """Zeros on `dev`; "fake" gives FakeTensors of one mode (the torch.compile tracing path)."""
    if dev == "fake":
        mode = FakeTensorMode()
        return [mode.from_tensor(torch.zeros(s, dtype=d)) for s, d in shapes_dtypes]
    return [torch.zeros(s, dtype=d, device=dev) for s, d in shapes_dtypes]


@pytest.mark.parametrize("dev", ERROR_DEVICES)
@pytest.mark.parametrize("case", OP_ERRORS)
@pytest.mark.parametrize("op", [rope_op, rope_backward_op, rope_inplace_op],
                         ids=["rope", "rope_backward", "rope_"])
def test_op_rejects_bad_input(op, case, dev):
    q_shape, k_shape, p_shape, dtypes, inv_freq, axis, match = OP_ERRORS[case]
    q, k, pos = _zeros_on(zip((q_shape, k_shape, p_shape), dtypes or _DEFAULT_DTYPES,
                              strict=True), dev)
    with pytest.raises(RuntimeError, match=rf"vlmkern\.{op._qualified_op_name[9:]}: {match}"):
        op(q, k, pos, inv_freq, axis, 1.0)


@pytest.mark.parametrize("dev", ["cpu", "meta"])
def test_op_rejects_more_than_int32_elements_per_token(dev):
    """The CUDA kernel indexes one token's (Hq + Hk) * D elements in int32."""
    q = torch.zeros(1, device=dev).expand(1, 1, 2**16, 2**15)  # stride 0: no memory
    k = torch.zeros(1, 1, 1, 2**15, device=dev)
    pos = torch.zeros(1, 1, 1, dtype=torch.int64, device=dev)
    with pytest.raises(RuntimeError, match=r"vlmkern\.rope: one token's q and k heads hold "
                       r"\(Hq \+ Hk\) \* D = 2147516416 elements"):
        rope_op(q, k, pos, _F, _A, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["k", "positions"])
def test_op_rejects_mixed_devices(where):
    q, k = torch.zeros(_Q, device="cuda"), torch.zeros(_K, device="cuda")
    pos = torch.zeros(_P, dtype=torch.int64, device="cuda")
    if where == "k":
        k = k.cpu()
    else:
        pos = pos.cpu()
    for op in (rope_op, rope_backward_op, rope_inplace_op):
        with pytest.raises(RuntimeError, match=rf"must be on .*device.*{where} on cpu"):
            op(q, k, pos, _F, _A, 1.0)


_MR, _VR, _RP = vlmkern.ops.mrope, vlmkern.ops.vision_rope, vlmkern.ops.rope
_QB, _KB = (2, 4, 6, 128), (2, 2, 6, 128)  # bhsd
WRAPPER_ERRORS = {  # id: (fn, q shape, k shape, positions shape, kwargs, match)
    "section-sum": (_MR, _QB, _KB, (3, 2, 6), {"mrope_section": [16, 24, 20]},
                    r"mrope_section \[16, 24, 20\] sums to 60, but rotary_dim/2 = 64"),
    "section-sum-partial": (_MR, _QB, _KB, (3, 2, 6), {"mrope_section": [16, 24, 24],
                                                       "rotary_dim": 64},
                            r"sums to 64, but rotary_dim/2 = 32"),
    "section-negative": (_MR, _QB, _KB, (3, 2, 6), {"mrope_section": [-8, 36, 36]},
                         r"mrope_section must be >= 0"),
    "interleaved-2-sections": (_MR, _QB, _KB, (3, 2, 6),
                               {"mrope_section": [32, 32], "interleaved": True},
                               r"interleaved M-RoPE needs 3 sections"),
    "rope-odd-rotary-dim": (_RP, _QB, _KB, (2, 6), {"rotary_dim": 63},
                            r"rotary_dim must be a positive even number, got 63"),
    "mrope-odd-rotary-dim": (_MR, _QB, _KB, (3, 2, 6),
                             {"mrope_section": [11, 10, 10], "rotary_dim": 63},
                             r"rotary_dim must be a positive even number, got 63"),
    "vision-d-not-div-4": (_VR, (6, 2, 18), (6, 2, 18), (6, 2), {},
                           r"head dim must be divisible by 4, got 18"),
    "vision-q-4d": (_VR, (1, 6, 2, 16), (1, 6, 2, 16), (6, 2), {},
                    r"q and k must be packed \(N, H, D\)"),
    "vision-positions-n3": (_VR, (6, 2, 16), (6, 2, 16), (6, 3), {},
                            r"positions must be \(N, 2\) \(h, w\), got \(6, 3\)"),
    "rope-positions-1d": (_RP, _QB, _KB, (6,), {}, r"positions must be \(B, S\) for this q"),
    "rope-packed-positions-2d": (_RP, (6, 2, 16), (6, 2, 16), (2, 6), {},
                                 r"positions must be \(N,\) for this q layout, got shape \(2, 6\)"),
    "mrope-positions-2-axes": (_MR, _QB, _KB, (2, 2, 6), {"mrope_section": [16, 24, 24]},
                               r"positions must be \(3, B, S\) or \(B, S\) for this q layout"),
    "mrope-packed-positions-1d": (_MR, (6, 2, 128), (6, 2, 128), (6,),
                                  {"mrope_section": [16, 24, 24]},
                                  r"positions must be \(3, N\) for this q layout"),
    "packed-layout-4d": (_RP, _QB, _KB, (2, 6), {"layout": "packed"},
                         r"layout='packed' needs \(N, H, D\) q"),
    "bad-layout": (_RP, _QB, _KB, (2, 6), {"layout": "bsdh"},
                   r"layout must be 'bhsd', 'bshd' or 'packed', got 'bsdh'"),
    "q-5d": (_RP, (1, *_QB), _KB, (2, 6), {},
             r"q must be \(B, H, S, D\), \(B, S, H, D\) or packed"),
}


@pytest.mark.parametrize("dev", ERROR_DEVICES)
@pytest.mark.parametrize("case", WRAPPER_ERRORS)
def test_wrapper_rejects_bad_input(case, dev):
    fn, q_shape, k_shape, p_shape, kwargs, match = WRAPPER_ERRORS[case]
    q, k, pos = _zeros_on([(q_shape, torch.float32), (k_shape, torch.float32),
                           (p_shape, torch.int64)], dev)
    with pytest.raises(ValueError, match=match):
        fn(q, k, pos, **kwargs)
