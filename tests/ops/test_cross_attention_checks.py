"""cross_attention autograd (gradcheck in float64, lse gradient), opcheck of cross_attention,
cross_attention_backward and mllama_kv_ranges, torch.compile, determinism and unwritten-output
detection (G7/G8), and bad inputs on real and meta tensors. Numerics: test_cross_attention.py."""

import pytest
import torch
from testing_utils import assert_bit_equal, deterministic_mode
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode
from xattn_testing import check_all, make_qkv, mllama_mask

import vlmkern

xattn_op = torch.ops.vlmkern.cross_attention
xattn_backward_op = torch.ops.vlmkern.cross_attention_backward
ranges_op = torch.ops.vlmkern.mllama_kv_ranges

# --- gradcheck (G2) -------------------------------------------------------------------------------

I32 = torch.int32
GRAD_CASES = {  # id: (B, Sq, Sk, Hq, Hk, D, layout, kwargs)
    "full-gqa": (2, 3, 5, 4, 2, 4, "bhsd", {}),
    "mqa-bshd-scale": (1, 4, 3, 3, 1, 6, "bshd", {"scale": 0.7}),
    "ranges-zero": (1, 4, 6, 2, 1, 4, "bhsd", {"kv_ranges": torch.tensor(
        [[[[0, 2], [4, 6]], [[1, 3], [3, 3]], [[0, 0], [0, 0]], [[5, 6], [0, 1]]]], dtype=I32)}),
    "ranges-uniform": (1, 3, 4, 2, 2, 4, "bhsd", {"masked_rows": "uniform", "kv_ranges":
                       torch.tensor([[[[0, 0]], [[1, 3]], [[2, 4]]]], dtype=I32)}),
    "prefix-lm": (2, 5, 5, 2, 1, 4, "bhsd", {"mode": "prefix_lm",
                                             "prefix_len": torch.tensor([0, 3])}),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck(case):
    B, Sq, Sk, Hq, Hk, D, layout, kw = GRAD_CASES[case]
    q, k, v = (t.requires_grad_() for t in make_qkv(layout, "contiguous", B, Sq, Sk, Hq, Hk, D,
                                                    torch.float64))
    assert torch.autograd.gradcheck(
        lambda q, k, v: vlmkern.ops.cross_attention(q, k, v, layout=layout, **kw), (q, k, v))


def test_gradcheck_packed_and_lse():
    """Packed segments, and the gradient through the returned log-sum-exp."""
    cq, ck = torch.tensor([0, 2, 5], dtype=I32), torch.tensor([0, 3, 4], dtype=I32)
    q = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(4, 1, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def fn(q, k, v):
        out, lse = vlmkern.ops.cross_attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck,
                                               return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_double_backward_raises():
    q, k, v = (t.requires_grad_() for t in make_qkv("bhsd", "contiguous", 1, 3, 4, 2, 1, 8,
                                                    torch.float64))
    (dq,) = torch.autograd.grad(vlmkern.ops.cross_attention(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported"):
        torch.autograd.grad(dq.sum(), k)


# --- opcheck (G1) ---------------------------------------------------------------------------------


def _sample(name, requires_grad):
    """Raw-op args (q, k, v (B, S, H, D), kv_ranges, cu_q, cu_k, prefix_len, scale, masked_rows)."""
    kw = {"kv_ranges": None, "cu_q": None, "cu_k": None, "prefix": None, "scale": None,
          "masked_rows": "zero"}
    if name == "contiguous":
        q, k, v = make_qkv("bshd", "contiguous", 2, 5, 7, 4, 2, 16, torch.float32)
    elif name == "empty-batch":
        q, k, v = make_qkv("bshd", "contiguous", 0, 5, 7, 2, 1, 16, torch.float32)
    elif name == "fused-ranges-uniform":  # non-contiguous views of fused projections
        q, k, v = make_qkv("bshd", "fused", 2, 6, 20, 4, 1, 8, torch.float32)
        kw["kv_ranges"] = vlmkern.ops.mllama_kv_ranges(mllama_mask(2, 6, 2, 2), 5)
        kw["masked_rows"] = "uniform"
    elif name == "expanded-prefix":
        q, k, v = make_qkv("bshd", "expanded_q", 3, 6, 6, 2, 2, 8, torch.float32)
        kw["prefix"], kw["scale"] = torch.tensor([0, 2, 9]), 0.3
    elif name == "packed":
        q, k, v = (t[:1].contiguous() for t in make_qkv("bshd", "strided_d", 1, 9, 12, 2, 1, 8,
                                                          torch.float32))
        kw["cu_q"], kw["cu_k"] = torch.tensor([0, 4, 9], dtype=I32), torch.tensor([0, 0, 12],
                                                                                    dtype=I32)
    else:
        raise AssertionError(name)
    q, k, v = (t.detach().requires_grad_(requires_grad) for t in (q, k, v))
    return (q, k, v, kw["kv_ranges"], kw["cu_q"], kw["cu_k"], kw["prefix"], kw["scale"],
            kw["masked_rows"])


SAMPLES = ["contiguous", "empty-batch", "fused-ranges-uniform", "expanded-prefix", "packed"]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("sample", SAMPLES)
def test_opcheck(sample, requires_grad):
    torch.library.opcheck(xattn_op.default, _sample(sample, requires_grad))


@pytest.mark.parametrize("sample", SAMPLES)
def test_opcheck_backward(sample):
    q, k, v, *rest = _sample(sample, False)
    out, lse = xattn_op(q, k, v, *rest)
    grad = torch.randn_like(out)
    torch.library.opcheck(xattn_backward_op.default,
                          (grad, q, k, v, out, lse, torch.randn_like(lse), *rest))


@pytest.mark.parametrize("shape", [(2, 5, 2, 4), (0, 3, 1, 1), (1, 4, 0, 4)])
def test_opcheck_mllama_kv_ranges(shape):
    mask = (torch.rand(shape) < 0.5).long()
    torch.library.opcheck(ranges_op.default, (mask, 7))
    torch.library.opcheck(ranges_op.default, (mask.transpose(2, 3).contiguous().transpose(2, 3), 3))


# --- determinism (G7, G8) -------------------------------------------------------------------------


@pytest.mark.parametrize("sample", SAMPLES)
def test_no_unwritten_output_and_repeatable(sample):
    q, k, v, *rest = _sample(sample, True)

    def fwd_bwd():
        out, lse = xattn_op(q, k, v, *rest)
        grads = torch.autograd.grad((out * 1.5).sum() + lse.nan_to_num(0, 0, 0).sum(), (q, k, v))
        return out, grads

    with deterministic_mode():
        out, grads = fwd_bwd()
    for t in (out, *grads):
        assert not t.isnan().any()
    out2, grads2 = fwd_bwd()
    for a, b in zip((out, *grads), (out2, *grads2), strict=True):
        assert_bit_equal(a, b)


# --- torch.compile (G11) --------------------------------------------------------------------------


def _mllama_block(x, kv, wq, wk, wv, mask):
    """Cross-attention as a Mllama layer calls it: projections, kv ranges, GQA, gate."""
    B, S, _ = x.shape
    q = (x @ wq).view(B, S, 4, 8).transpose(1, 2)
    k = (kv @ wk).view(B, -1, 2, 8).transpose(1, 2)
    v = (kv @ wv).view(B, -1, 2, 8).transpose(1, 2)
    ranges = vlmkern.ops.mllama_kv_ranges(mask, 5)
    out = vlmkern.ops.cross_attention(q, k, v, kv_ranges=ranges)
    return x + torch.tanh(torch.tensor(0.3)) * out.transpose(1, 2).reshape(B, S, -1)


def test_compile_fullgraph_few_recompiles():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(_mllama_block, fullgraph=True, backend=counter)
    w = [torch.randn(32, 32, requires_grad=True), torch.randn(32, 16, requires_grad=True),
         torch.randn(32, 16, requires_grad=True)]
    for B in (1, 2, 3, 5):
        x = torch.randn(B, 7, 32, requires_grad=True)
        kv = torch.randn(B, 2 * 2 * 5, 32)
        mask = mllama_mask(B, 7, 2, 2, seed=B)
        out = fn(x, kv, *w, mask)
        out.sum().backward()
        ref = _mllama_block(x.detach(), kv, *(t.detach() for t in w), mask)
        assert (out.detach() - ref).abs().max() < 1e-5
    assert counter.frame_count <= 2
    torch._dynamo.reset()


# --- bad inputs (G5) ------------------------------------------------------------------------------


def _qkv(**over):
    args = {"q": torch.randn(2, 5, 4, 16), "k": torch.randn(2, 7, 2, 16),
            "v": torch.randn(2, 7, 2, 16)}
    args.update(over)
    return args


BAD = {  # id: (op kwargs overrides, message)
    "q-rank": ({"q": torch.randn(5, 4, 16)}, r"cross_attention: q must be a 4-D tensor"),
    "k-rank": ({"k": torch.randn(7, 2, 16)}, r"cross_attention: k must be a 4-D tensor"),
    "q-dtype": ({"q": torch.randn(2, 5, 4, 16).int()}, r"q must be float32, float16"),
    "dtype-mix": ({"k": torch.randn(2, 7, 2, 16).half()}, r"k and v must have q's dtype"),
    "v-shape": ({"v": torch.randn(2, 6, 2, 16)}, r"v shape .* differs from k shape"),
    "batch": ({"k": torch.randn(1, 7, 2, 16), "v": torch.randn(1, 7, 2, 16)}, r"k batch 1 differs"),
    "head-dim-mismatch": ({"k": torch.randn(2, 7, 2, 8), "v": torch.randn(2, 7, 2, 8)},
                          r"k head dim 8 differs from q head dim 16"),
    "head-dim": ({"q": torch.randn(2, 5, 4, 320), "k": torch.randn(2, 7, 2, 320),
                  "v": torch.randn(2, 7, 2, 320)}, r"head dim D=320 is not supported"),
    "gqa": ({"k": torch.randn(2, 7, 3, 16), "v": torch.randn(2, 7, 3, 16)},
            r"q heads Hq=4 must be a multiple of k/v heads Hk=3"),
    "masked-rows": ({"masked_rows": "nan"}, r"masked_rows must be 'zero' or 'uniform'"),
    "scale": ({"scale": float("inf")}, r"scale must be finite"),
    "cu-alone": ({"cu_seqlens_q": torch.tensor([0, 5], dtype=I32)},
                 r"cu_seqlens_q and cu_seqlens_k must be given together"),
    "cu-dtype": ({"cu_seqlens_q": torch.tensor([0.0, 5.0]), "cu_seqlens_k": torch.tensor([0, 7])},
                 r"cu_seqlens_q must be int32 or int64"),
    "cu-batch": ({"cu_seqlens_q": torch.tensor([0, 5], dtype=I32),
                  "cu_seqlens_k": torch.tensor([0, 7], dtype=I32)}, r"packed q .* got batch 2"),
    "cu-length": ({"q": torch.randn(1, 5, 4, 16), "k": torch.randn(1, 7, 2, 16),
                   "v": torch.randn(1, 7, 2, 16), "cu_seqlens_q": torch.tensor([0, 5], dtype=I32),
                   "cu_seqlens_k": torch.tensor([0, 3, 7], dtype=I32)},
                  r"must both have N \+ 1 >= 1 entries"),
    "ranges-shape": ({"kv_ranges": torch.zeros(2, 4, 1, 2, dtype=I32)},
                     r"kv_ranges shape \[2, 4, 1, 2\] must be \(2, 5, R, 2\)"),
    "ranges-rank": ({"kv_ranges": torch.zeros(2, 5, 2, dtype=I32)},
                    r"kv_ranges must be a 4-D tensor"),
    "ranges-and-prefix": ({"kv_ranges": torch.zeros(2, 5, 1, 2, dtype=I32),
                           "prefix_len": torch.tensor([1, 2])}, r"cannot be combined"),
    "prefix-length": ({"prefix_len": torch.tensor([1, 2, 3])},
                      r"prefix_len has 3 entries, expected one per sequence \(2\)"),
}
VALUE_BAD = {  # checked on the CPU only (reading them on CUDA would be a host sync)
    "ranges-out-of-bounds": ({"kv_ranges": torch.tensor([0, 8], dtype=I32).expand(2, 5, 1, 2)},
                             r"kv_ranges\[0, 0, 0\] = \[0, 8\) is out of bounds"),
    "ranges-reversed": ({"kv_ranges": torch.tensor([3, 2], dtype=I32).expand(2, 5, 1, 2)},
                        r"need 0 <= start <= end <= Lk"),
    "prefix-negative": ({"prefix_len": torch.tensor([1, -2])}, r"prefix_len must be >= 0"),
    "cu-not-monotone": ({"q": torch.randn(1, 5, 4, 16), "k": torch.randn(1, 7, 2, 16),
                         "v": torch.randn(1, 7, 2, 16),
                         "cu_seqlens_q": torch.tensor([0, 4, 3, 5], dtype=I32),
                         "cu_seqlens_k": torch.tensor([0, 2, 5, 7], dtype=I32)},
                        r"must be non-decreasing"),
    "cu-total": ({"q": torch.randn(1, 5, 4, 16), "k": torch.randn(1, 7, 2, 16),
                  "v": torch.randn(1, 7, 2, 16), "cu_seqlens_q": torch.tensor([0, 4], dtype=I32),
                  "cu_seqlens_k": torch.tensor([0, 7], dtype=I32)}, r"cu_seqlens_q\[-1\] = 4"),
    "cu-start": ({"q": torch.randn(1, 5, 4, 16), "k": torch.randn(1, 7, 2, 16),
                  "v": torch.randn(1, 7, 2, 16), "cu_seqlens_q": torch.tensor([1, 5], dtype=I32),
                  "cu_seqlens_k": torch.tensor([0, 7], dtype=I32)}, r"must start at 0"),
}


def _call(args):
    a = dict(args)
    return xattn_op(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("kv_ranges", None),
                    a.pop("cu_seqlens_q", None), a.pop("cu_seqlens_k", None),
                    a.pop("prefix_len", None), a.pop("scale", None), a.pop("masked_rows", "zero"))


@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
@pytest.mark.parametrize("case", BAD)
def test_bad_inputs(case, meta):
    over, match = BAD[case]
    args = _qkv(**over)
    if meta:
        args = {n: t.to("meta") if isinstance(t, torch.Tensor) else t for n, t in args.items()}
    with pytest.raises((RuntimeError, ValueError), match=match):
        _call(args)


@pytest.mark.parametrize("case", VALUE_BAD)
def test_bad_index_values(case):
    over, match = VALUE_BAD[case]
    with pytest.raises(RuntimeError, match=match):
        _call(_qkv(**over))


def test_bad_device():
    args = _qkv(k=torch.randn(2, 7, 2, 16, device="meta"))
    with pytest.raises(RuntimeError, match=r"q, k and v must be on one device"):
        _call(args)
    with pytest.raises(RuntimeError, match=r"prefix_len must be on the device of q"):
        _call(_qkv(prefix_len=torch.tensor([1, 2], device="meta")))


def test_too_many_keys_meta():
    k = torch.empty(1, 2**31, 1, 8, device="meta")
    with pytest.raises(RuntimeError, match=r"must fit in int32"):
        xattn_op(torch.empty(1, 2, 1, 8, device="meta"), k, k)


def test_bad_backward_inputs():
    q, k, v, *rest = _sample("contiguous", False)
    out, lse = xattn_op(q, k, v, *rest)
    with pytest.raises(RuntimeError, match=r"cross_attention_backward: lse must be \(B, Hq, Sq\)"):
        xattn_backward_op(out, q, k, v, out, lse.double(), None, *rest)
    with pytest.raises(RuntimeError, match=r"grad_out and out must be \(B, Sq, Hq, D\)"):
        xattn_backward_op(out[:1], q, k, v, out, lse, None, *rest)


CUDA_BAD = {  # id: ((B, Sq, Sk, Hq, D, dtype), {tensor: device}, message); fake CUDA tensors
    "fp32": ((1, 4, 6, 2, 64, torch.float32), {}, r"the CUDA kernel takes float16 or bfloat16 q"),
    "head-dim": ((1, 4, 6, 2, 40, torch.bfloat16), {},
                 r"head dim D=40 is not supported on CUDA: D must be 64, 72, 80, 96 or 128"),
    "heads": ((1, 2, 3, 65536, 64, torch.float16), {},
              r"Hq=65536 q heads exceed the CUDA grid limit 65535"),
    "out-device": ((1, 4, 6, 2, 64, torch.float16), {"out": "cpu"},
                   r"grad_out, out and lse must be on q's device cuda:0, got cpu"),
    "grad-out-device": ((1, 4, 6, 2, 64, torch.float16), {"grad_out": "cpu"},
                        r"grad_out, out and lse must be on q's device"),
    "lse-device": ((1, 4, 6, 2, 64, torch.bfloat16), {"lse": "cpu"},
                   r"grad_out, out and lse must be on q's device"),
    "grad-lse-device": ((1, 4, 6, 2, 64, torch.bfloat16), {"grad_lse": "cpu"},
                        r"grad_lse must be on q's device cuda:0, got cpu"),
    "grid": ((2**31, 1, 6, 1, 64, torch.float16), {},
             r"B \* ceil\(Sq / 64\) = 2147483648 query windows .* exceed the CUDA grid"),
}


@pytest.mark.parametrize("case", CUDA_BAD)
def test_bad_cuda_inputs_fake(case):
    """The CUDA kernels' own limits (check_xattn_cuda, the backward's devices and grid), raised
    by the fake kernels on fake CUDA tensors: no GPU needed."""
    (b, sq, sk, hq, d, dtype), devices, match = CUDA_BAD[case]
    with FakeTensorMode():
        def make(name, shape, dt=dtype):
            return torch.empty(shape, dtype=dt, device=devices.get(name, "cuda:0"))

        q, k = make("q", (b, sq, hq, d)), make("k", (b, sk, 1, d))
        out, grad_out = make("out", (b, sq, hq, d)), make("grad_out", (b, sq, hq, d))
        lse, grad_lse = (make(n, (b, hq, sq), torch.float32) for n in ("lse", "grad_lse"))
        if not devices and case != "grid":  # the forward's fake checks the same
            with pytest.raises(RuntimeError, match=r"vlmkern.cross_attention: " + match):
                xattn_op(q, k, k)
        with pytest.raises(RuntimeError, match=r"vlmkern.cross_attention_backward: " + match):
            xattn_backward_op(grad_out, q, k, k, out, lse, grad_lse)


@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
def test_bad_mllama_mask(meta):
    dev = "meta" if meta else "cpu"
    with pytest.raises(RuntimeError, match=r"mllama_kv_ranges: cross_attention_mask must be a 4-D"):
        ranges_op(torch.ones(2, 3, 4, device=dev), 7)
    with pytest.raises(RuntimeError, match=r"num_vision_tokens must be >= 1"):
        ranges_op(torch.ones(2, 3, 1, 4, device=dev), 0)
    with pytest.raises(RuntimeError, match=r"keys exceed int32 ranges"):
        ranges_op(torch.ones(1, 1, 4, 4, device=dev), 2**28)


def test_wrapper_bad_arguments():
    q, k, v = make_qkv("bhsd", "contiguous", 1, 3, 4, 2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match=r"mode must be 'full' or 'prefix_lm'"):
        vlmkern.ops.cross_attention(q, k, v, mode="causal")
    with pytest.raises(ValueError, match=r"prefix_len is required by mode='prefix_lm'"):
        vlmkern.ops.cross_attention(q, k, v, mode="prefix_lm")
    with pytest.raises(ValueError, match=r"layout must be 'bhsd' or 'bshd'"):
        vlmkern.ops.cross_attention(q, k, v, layout="sbhd")
    with pytest.raises(ValueError, match=r"with cu_seqlens, q must be packed"):
        vlmkern.ops.cross_attention(q, k, v, cu_seqlens_q=torch.tensor([0, 3]),
                                    cu_seqlens_k=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"q must be \(B, H, S, D\)"):
        vlmkern.ops.cross_attention(q[0], k, v)


def test_dead_rows_across_q_blocks():
    """Dead rows in every position of a q block, both behaviours: finite everywhere (G6)."""
    B, S, M, T = 1, 130, 1, 2
    mask = mllama_mask(B, S, M, T, dead_rows=70)
    ranges = vlmkern.ops.mllama_kv_ranges(mask, 9)
    q, k, v = make_qkv("bhsd", "fused", B, S, 18, 4, 2, 16, torch.bfloat16)
    for masked_rows in ("zero", "uniform"):
        check_all(q, k, v, kv_ranges=ranges, masked_rows=masked_rows)
