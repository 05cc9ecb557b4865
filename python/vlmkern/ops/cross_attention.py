"""Cross-attention for VLMs: Llama-3.2-Vision (Mllama) text-to-image attention with per-token image
visibility, BLIP-2 Q-Former / Perceiver learned queries, packed variable-length segments
(Qwen2-VL ViT) and PaliGemma prefix-LM self-attention; forward, backward, fake kernels.

One op, ``torch.ops.vlmkern.cross_attention(q, k, v, kv_ranges, cu_seqlens_q, cu_seqlens_k,
prefix_len, scale, masked_rows) -> (out, lse)``, on q ``(B, Sq, Hq, D)`` and k, v ``(B, Sk, Hk,
D)`` of any strides (HF's ``(B, H, S, D)`` is a transposed view; packed tokens are ``(1, total,
H, D)``); its backward is ``cross_attention_backward``. Mllama's tile mask becomes visible key
ranges with ``mllama_kv_ranges`` (never a dense additive mask).
"""

from __future__ import annotations

import math

import torch

from ._autocast import register_autocast
from ._checks import check_rank

_OP = "cross_attention"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INTS = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256  # kXattnMaxHeadDim in csrc/common/cross_attention.h
CUDA_HEAD_DIMS = (64, 72, 80, 96, 128)  # check_xattn_cuda in csrc/common/cross_attention.cpp
CUDA_DTYPES = (torch.float16, torch.bfloat16)  # the CUDA kernels' dtypes (same check)


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    kv_ranges: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    masked_rows: str = "zero",
    mode: str = "full",
    prefix_len: torch.Tensor | None = None,
    layout: str = "bhsd",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scale · q kᵀ) v`` over the keys each query may see (non-causal unless prefix-LM).

    Args:
        q: ``(B, Hq, Sq, D)`` (``layout="bhsd"``, HF's attention layout), ``(B, Sq, Hq, D)``
            (``"bshd"``) or packed ``(total_q, Hq, D)`` with ``cu_seqlens_*``. Any strides: views
            of a fused qkv projection and learned queries expanded over the batch (batch stride
            0, BLIP-2 Q-Former) are read in place.
        k, v: the same layout with ``Hk`` heads and ``Sk`` keys; ``Hq % Hk == 0`` (GQA / MQA).
            CPU: fp32 / fp16 / bf16 / fp64, ``D`` in ``[1, 256]``. CUDA (flash-attention 2
            forward): fp16 / bf16 only (fp32 raises: cast, or run on the CPU), ``D`` in
            ``{64, 72, 80, 96, 128}``; a head dim that is not contiguous (or rows not 16-byte
            aligned) is copied once to a contiguous tensor, every other view is read in place.
        scale: default ``D ** -0.5``.
        kv_ranges: int32/int64 ``(B, Sq, R, 2)`` (packed: ``(total_q, R, 2)``): query row ``i``
            sees the union of its ``[start, end)`` key ranges (relative to its sequence's keys;
            ``start == end`` is an unused slot). Build it from Mllama's ``(B, S, M, T)`` tile mask
            with :func:`mllama_kv_ranges`.
        cu_seqlens_q, cu_seqlens_k: int32 ``(N + 1,)`` offsets of N packed sequences (given
            together; validated on the CPU, trusted on CUDA to avoid a host sync: out-of-range
            offsets and kv_ranges / prefix_len values are clamped there, not reported; with
            offsets that do not start at 0 and end at the token count, rows outside every
            segment are left unwritten on CUDA).
        masked_rows: what a query row that sees no key returns: ``"zero"`` (0, Meta's Llama 3.2
            reference) or ``"uniform"`` (HF transformers: its additive mask row is all zero, so the
            row attends over *all* ``Sk`` keys with ordinary softmax weights).
        mode: ``"full"``, or ``"prefix_lm"`` (PaliGemma): key ``j`` is visible to query ``i`` iff
            ``j < prefix_len[b]`` or ``j <= i + (Sk - Sq)`` (bottom-right aligned: equal lengths in
            training, a decode step with ``Sq < Sk`` sees its past). Needs ``prefix_len``
            (int ``(B,)`` or ``(N,)``).
        return_lse: also return the fp32 (fp64 for fp64) log-sum-exp ``(B, Hq, Sq)`` (packed:
            ``(Hq, total_q)``); ``-inf`` for rows that see nothing.

    Returns:
        ``out`` in q's layout and dtype (a view of a dense ``(B, Sq, Hq, D)`` buffer, so HF's
        ``out.transpose(1, 2).reshape(B, S, -1)`` is free). Differentiable in q, k, v (and through
        lse); the backward is deterministic (fixed summation order, no atomics) on the CPU and
        on CUDA (flash-attention 2 style: a delta kernel, a dK / dV kernel over key windows and
        a dQ kernel over query windows). Double backward raises. An expanded q (batch stride 0)
        gets one dq per batch row, which autograd sums over the expand.

    Mllama's gate (``residual + tanh(gate) · o_proj(attn)``) is applied after the output
    projection, so the op takes no gate / residual: :func:`vlmkern.ops.gated_linear` fuses gate
    and residual into o_proj's GEMM (cuBLASLt epilogue on CUDA), as
    :class:`vlmkern.nn.MllamaCrossAttentionDecoderLayer` does.
    """
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if mode not in ("full", "prefix_lm"):
        raise ValueError(f"vlmkern.{_OP}: mode must be 'full' or 'prefix_lm', got {mode!r}")
    if (mode == "prefix_lm") != (prefix_len is not None):
        raise ValueError(f"vlmkern.{_OP}: prefix_len is required by mode='prefix_lm' and only "
                         f"allowed with it (mode={mode!r})")
    q4, k4, v4 = (_to_op_layout(t, name, layout, packed) for t, name in ((q, "q"), (k, "k"),
                                                                        (v, "v")))
    if packed and kv_ranges is not None and kv_ranges.dim() == 3:
        kv_ranges = kv_ranges.unsqueeze(0)
    out, lse = torch.ops.vlmkern.cross_attention(
        q4, k4, v4, kv_ranges, cu_seqlens_q, cu_seqlens_k, prefix_len, scale, masked_rows
    )
    if packed:
        out, lse = out.squeeze(0), lse.squeeze(0)
    elif layout == "bhsd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def mllama_kv_ranges(cross_attention_mask: torch.Tensor,
                     num_vision_tokens: int = 1601) -> torch.Tensor:
    """Visible key ranges of Mllama's processor mask, for :func:`cross_attention`.

    Args:
        cross_attention_mask: ``(B, S, M, T)`` 0/1 (any int / bool / float dtype): may text token
            ``s`` see tile ``t`` of image ``m``. A tile is visible iff its value is 1 (as in HF's
            ``_prepare_cross_attention_mask``).
        num_vision_tokens: keys per tile (1601 for Llama-3.2-Vision: 40×40 patches + CLS).

    Returns:
        int32 ``(B, S, ceil(M·T/2), 2)``: ``[start, end)`` ranges over the ``M·T·num_vision_tokens``
        keys (tile ``(m, t)`` is keys ``[(m·T + t)·n, (m·T + t + 1)·n)``), adjacent visible tiles
        merged, unused slots ``[0, 0)``.
    """
    return torch.ops.vlmkern.mllama_kv_ranges(cross_attention_mask, num_vision_tokens)


def _to_op_layout(t: torch.Tensor, name: str, layout: str, packed: bool) -> torch.Tensor:
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"vlmkern.{_OP}: layout must be 'bhsd' or 'bshd', got {layout!r}")
    if packed:
        if t.dim() != 3:
            raise ValueError(f"vlmkern.{_OP}: with cu_seqlens, {name} must be packed "
                             f"(total, H, D), got shape {tuple(t.shape)}")
        return t.unsqueeze(0)
    if t.dim() != 4:
        shape = "(B, H, S, D)" if layout == "bhsd" else "(B, S, H, D)"
        raise ValueError(f"vlmkern.{_OP}: {name} must be {shape} (or packed (total, H, D) with "
                         f"cu_seqlens), got shape {tuple(t.shape)}")
    return t.transpose(1, 2) if layout == "bhsd" else t


# ---- fake kernels: the checks and messages of csrc/common/cross_attention.cpp -------------------


def _check_index(op, t, q, name, rank, layout) -> None:
    check_rank(t, rank, op, name, layout)
    torch._check(t.dtype in _INTS,
                 lambda: f"vlmkern.{op}: {name} must be int32 or int64, got {t.dtype}")
    torch._check(t.device == q.device, lambda: f"vlmkern.{op}: {name} must be on the device of "
                 f"q, got q on {q.device}, {name} on {t.device}")


def _check(op, q, k, v, kv_ranges, cu_q, cu_k, prefix_len, scale, masked_rows) -> None:
    check_rank(q, 4, op, "q", "(B, Sq, Hq, D)")
    check_rank(k, 4, op, "k", "(B, Sk, Hk, D)")
    check_rank(v, 4, op, "v", "(B, Sk, Hk, D)")
    torch._check(q.dtype in _FLOATS, lambda: f"vlmkern.{op}: q must be float32, float16, "
                 f"bfloat16 or float64, got {q.dtype}")
    torch._check(k.dtype == q.dtype and v.dtype == q.dtype, lambda: f"vlmkern.{op}: k and v must "
                 f"have q's dtype {q.dtype}, got k {k.dtype}, v {v.dtype}")
    torch._check(k.device == q.device and v.device == q.device, lambda: f"vlmkern.{op}: q, k and "
                 f"v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}")
    torch._check(v.shape == k.shape, lambda: f"vlmkern.{op}: v shape {list(v.shape)} differs "
                 f"from k shape {list(k.shape)}")
    torch._check(k.shape[0] == q.shape[0], lambda: f"vlmkern.{op}: k batch {k.shape[0]} differs "
                 f"from q batch {q.shape[0]} (expand shared queries or keys to the batch)")
    b, sq, hq, d = q.shape
    torch._check(k.shape[3] == d, lambda: f"vlmkern.{op}: k head dim {k.shape[3]} differs from "
                 f"q head dim {d}")
    torch._check(1 <= d <= MAX_HEAD_DIM, lambda: f"vlmkern.{op}: head dim D={d} is not "
                 f"supported: D must be in [1, {MAX_HEAD_DIM}]")
    torch._check(k.shape[1] <= 2**31 - 1, lambda: f"vlmkern.{op}: k has {k.shape[1]} keys; key "
                 "positions (kv_ranges, blocks) must fit in int32")
    hk = k.shape[2]
    torch._check(hk >= 1 and hq % hk == 0, lambda: f"vlmkern.{op}: q heads Hq={hq} must be a "
                 f"multiple of k/v heads Hk={hk} (GQA/MQA)")
    torch._check(masked_rows in ("zero", "uniform"), lambda: f"vlmkern.{op}: masked_rows must be "
                 f"'zero' or 'uniform', got '{masked_rows}'")
    s = d**-0.5 if scale is None else scale
    torch._check(math.isfinite(s), lambda: f"vlmkern.{op}: scale must be finite, got {s}")
    torch._check((cu_q is None) == (cu_k is None), lambda: f"vlmkern.{op}: cu_seqlens_q and "
                 "cu_seqlens_k must be given together")
    segments = b
    if cu_q is not None:
        _check_index(op, cu_q, q, "cu_seqlens_q", 1, "(N + 1,)")
        _check_index(op, cu_k, q, "cu_seqlens_k", 1, "(N + 1,)")
        n1 = cu_q.shape[0]
        torch._check(n1 >= 1 and cu_k.shape[0] == n1, lambda: f"vlmkern.{op}: cu_seqlens_q and "
                     f"cu_seqlens_k must both have N + 1 >= 1 entries, got {n1} and "
                     f"{cu_k.shape[0]}")
        torch._check(b == 1, lambda: f"vlmkern.{op}: packed q (with cu_seqlens) must be (1, "
                     f"total_q, Hq, D), got batch {b}")
        segments = n1 - 1
    torch._check(kv_ranges is None or prefix_len is None,
                 lambda: f"vlmkern.{op}: kv_ranges and prefix_len cannot be combined")
    if kv_ranges is not None:
        _check_index(op, kv_ranges, q, "kv_ranges", 4, "(B, Sq, R, 2)")
        torch._check(kv_ranges.shape[0] == b and kv_ranges.shape[1] == sq
                     and kv_ranges.shape[3] == 2, lambda: f"vlmkern.{op}: kv_ranges shape "
                     f"{list(kv_ranges.shape)} must be ({b}, {sq}, R, 2) to match q")
    if prefix_len is not None:
        _check_index(op, prefix_len, q, "prefix_len", 1, "(B,) or (N,)")
        torch._check(prefix_len.shape[0] == segments, lambda: f"vlmkern.{op}: prefix_len has "
                     f"{prefix_len.shape[0]} entries, expected one per sequence ({segments})")


def _check_cuda(op, q) -> None:
    """The CUDA kernel's extra limits (check_xattn_cuda), only for CUDA tensors."""
    torch._check(q.dtype in (torch.float16, torch.bfloat16), lambda: f"vlmkern.{op}: the CUDA "
                 f"kernel takes float16 or bfloat16 q, k, v, got {q.dtype} (cast them, or run on "
                 "the CPU)")
    d = q.shape[3]
    torch._check(d in CUDA_HEAD_DIMS, lambda: f"vlmkern.{op}: head dim D={d} is not supported "
                 f"on CUDA: D must be 64, 72, 80, 96 or 128 (the CPU path takes [1, "
                 f"{MAX_HEAD_DIM}])")
    torch._check(q.shape[2] <= 65535, lambda: f"vlmkern.{op}: Hq={q.shape[2]} q heads exceed the "
                 "CUDA grid limit 65535")


def _check_cuda_backward(op, q, k, grad_out, out, lse, grad_lse) -> None:
    """The CUDA backward's extra limits: check_xattn_cuda, then its device and grid checks."""
    _check_cuda(op, q)
    for t in (grad_out, out, lse):
        torch._check(t.device == q.device, lambda t=t: f"vlmkern.{op}: grad_out, out and lse "
                     f"must be on q's device {q.device}, got {t.device}")
    torch._check(grad_lse is None or grad_lse.device == q.device, lambda: f"vlmkern.{op}: "
                 f"grad_lse must be on q's device {q.device}, got {grad_lse.device}")
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    wq, wk = b * ((sq + 63) // 64), b * ((sk + 63) // 64)
    torch._check(wq <= 2**31 - 1 and wk <= 2**31 - 1, lambda: f"vlmkern.{op}: B * ceil(Sq / "
                 f"64) = {wq} query windows or B * ceil(Sk / 64) = {wk} key windows exceed the "
                 "CUDA grid (2^31 - 1)")


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("vlmkern::cross_attention")
def _cross_attention_fake(q, k, v, kv_ranges=None, cu_seqlens_q=None, cu_seqlens_k=None,
                          prefix_len=None, scale=None, masked_rows="zero"):
    _check(_OP, q, k, v, kv_ranges, cu_seqlens_q, cu_seqlens_k, prefix_len, scale, masked_rows)
    if q.device.type == "cuda":
        _check_cuda(_OP, q)
    b, sq, hq, d = q.shape
    return q.new_empty((b, sq, hq, d)), q.new_empty((b, hq, sq), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("vlmkern::cross_attention_backward")
def _cross_attention_backward_fake(grad_out, q, k, v, out, lse, grad_lse=None, kv_ranges=None,
                                   cu_seqlens_q=None, cu_seqlens_k=None, prefix_len=None,
                                   scale=None, masked_rows="zero"):
    op = "cross_attention_backward"
    _check(op, q, k, v, kv_ranges, cu_seqlens_q, cu_seqlens_k, prefix_len, scale, masked_rows)
    b, sq, hq, d = q.shape
    o_shape, l_shape, lt = [b, sq, hq, d], [b, hq, sq], _lse_dtype(q.dtype)
    torch._check(list(grad_out.shape) == o_shape and list(out.shape) == o_shape,
                 lambda: f"vlmkern.{op}: grad_out and out must be (B, Sq, Hq, D) = {o_shape}, "
                 f"got {list(grad_out.shape)} and {list(out.shape)}")
    torch._check(grad_out.dtype == q.dtype and out.dtype == q.dtype,
                 lambda: f"vlmkern.{op}: grad_out and out must have q's dtype {q.dtype}")
    torch._check(list(lse.shape) == l_shape and lse.dtype == lt, lambda: f"vlmkern.{op}: lse must "
                 f"be (B, Hq, Sq) = {l_shape} of {lt}, got {list(lse.shape)} of {lse.dtype}")
    if grad_lse is not None:
        torch._check(list(grad_lse.shape) == l_shape and grad_lse.dtype == lt,
                     lambda: f"vlmkern.{op}: grad_lse must be (B, Hq, Sq) = {l_shape} of {lt}")
    if q.device.type == "cuda":
        _check_cuda_backward(op, q, k, grad_out, out, lse, grad_lse)
    hk, sk = k.shape[2], k.shape[1]
    return (q.new_empty((b, sq, hq, d)), k.new_empty((b, sk, hk, d)), v.new_empty((b, sk, hk, d)))


@torch.library.register_fake("vlmkern::mllama_kv_ranges")
def _mllama_kv_ranges_fake(cross_attention_mask, num_vision_tokens=1601):
    op, mask = "mllama_kv_ranges", cross_attention_mask
    check_rank(mask, 4, op, "cross_attention_mask", "(B, S, M, T)")
    torch._check(not mask.dtype.is_complex, lambda: f"vlmkern.{op}: cross_attention_mask must be "
                 f"an integer, bool or float tensor, got {mask.dtype}")
    torch._check(num_vision_tokens >= 1, lambda: f"vlmkern.{op}: num_vision_tokens must be >= 1, "
                 f"got {num_vision_tokens}")
    b, s, m, t = mask.shape
    keys = m * t * num_vision_tokens
    torch._check(keys <= 2**31 - 1, lambda: f"vlmkern.{op}: M*T*num_vision_tokens = {keys} keys "
                 "exceed int32 ranges")
    return mask.new_empty((b, s, (m * t + 1) // 2, 2), dtype=torch.int32)


# ---- autograd: the backward op recomputes P from lse ---------------------------------------------


def _setup(ctx, inputs, output) -> None:
    q, k, v, kv_ranges, cu_q, cu_k, prefix_len, scale, masked_rows = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_ranges, cu_q, cu_k, prefix_len)
    ctx.scale, ctx.masked_rows = scale, masked_rows
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_ranges, cu_q, cu_k, prefix_len = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.vlmkern.cross_attention_backward(
        grad_out, q, k, v, out, lse, grad_lse, kv_ranges, cu_q, cu_k, prefix_len, ctx.scale,
        ctx.masked_rows,
    )
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("vlmkern::cross_attention", _backward, setup_context=_setup)


def _no_double_backward(ctx, grad_dq, grad_dk, grad_dv):
    raise RuntimeError("vlmkern.cross_attention_backward: double backward (gradients of the "
                       "attention gradients) is not supported")


torch.library.register_autograd("vlmkern::cross_attention_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
register_autocast("cross_attention")
