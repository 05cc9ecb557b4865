"""Rotary position embeddings for VLMs: 1D RoPE, Qwen2-VL-family vision 2D RoPE and M-RoPE
(sectioned for Qwen2-VL / 2.5-VL, interleaved for Qwen3-VL), forward, backward and in place.

All of them run one table-driven op, ``torch.ops.vlmkern.rope``: frequency ``f`` of the rotary
half takes its position from axis ``freq_axis[f]`` of ``positions`` and has inverse frequency
``inv_freq[f]`` (fp32, computed exactly as HF computes it); angles are ``float(pos) * inv_freq``
in fp32 inside the kernel (no cos/sin tensors in memory) and dims ``(f, f + R/2)`` of every q and
k head are rotated together (HF's ``rotate_half`` convention).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ._checks import check_rank

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_FREQS = 256  # kMaxRopeFreqs in csrc/common/rope_params.h


# ---- frequency tables (cached; plain Python lists so they are compile-time constants) ---------


def hf_inv_freq(dim: int, theta: float) -> list[float]:
    """``1 / theta ** (arange(0, dim, 2) / dim)`` in fp32, as HF's default RoPE init computes it."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    return inv.tolist()


def _memo(fn):
    """Caches a table builder by its (hashable) arguments. Not functools.lru_cache: torch.compile
    unwraps that and traces the body (whose .tolist() it cannot trace); with a plain function
    ``assume_constant_result`` makes it run the builder at trace time and bake in the result."""
    cache: dict = {}

    @functools.wraps(fn)
    def cached(*args):
        if args not in cache:
            cache[args] = fn(*args)
        return cache[args]

    return torch.compiler.assume_constant_result(cached)


@_memo
def rope_table(rotary_dim: int, theta: float) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Plain 1D RoPE over ``rotary_dim`` dims: one position axis."""
    _check_even(rotary_dim, "rotary_dim")
    return tuple(hf_inv_freq(rotary_dim, theta)), (0,) * (rotary_dim // 2)


@_memo
def vision_rope_table(head_dim: int, theta: float) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Qwen2-VL vision RoPE: ``[f_h, f_w]`` over the rotary half, each over ``head_dim/4`` freqs."""
    if head_dim % 4:
        raise ValueError(f"vlmkern.vision_rope: head dim must be divisible by 4, got {head_dim}")
    inv = hf_inv_freq(head_dim // 2, theta)
    quarter = head_dim // 4
    return tuple(inv + inv), (0,) * quarter + (1,) * quarter


@_memo
def mrope_table(
    mrope_section: tuple[int, ...], theta: float, interleaved: bool, rotary_dim: int
) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """M-RoPE: sectioned (Qwen2-VL, 2.5-VL) or interleaved (Qwen3-VL) axis per frequency."""
    _check_even(rotary_dim, "rotary_dim")
    half = rotary_dim // 2
    if sum(mrope_section) != half:
        raise ValueError(
            f"vlmkern.mrope: mrope_section {list(mrope_section)} sums to {sum(mrope_section)}, "
            f"but rotary_dim/2 = {half}"
        )
    if any(s < 0 for s in mrope_section):
        raise ValueError(f"vlmkern.mrope: mrope_section must be >= 0, got {list(mrope_section)}")
    if interleaved:
        if len(mrope_section) != 3:
            raise ValueError(
                f"vlmkern.mrope: interleaved M-RoPE needs 3 sections (t, h, w), got "
                f"{list(mrope_section)}"
            )
        axis = [0] * half  # t everywhere, then h at 1, 4, 7, ... and w at 2, 5, 8, ...
        for a in (1, 2):
            for f in range(a, min(3 * mrope_section[a], half), 3):
                axis[f] = a
    else:
        axis = [i % 3 for i, n in enumerate(mrope_section) for _ in range(n)]
    return tuple(hf_inv_freq(rotary_dim, theta)), tuple(axis)


def _check_even(value: int, name: str) -> None:
    if value <= 0 or value % 2:
        raise ValueError(f"vlmkern.rope: {name} must be a positive even number, got {value}")


# ---- layouts: every public function maps q/k/positions to the op's (B, S, H, D) + (A, B, S) ----


def _to_bshd(t: torch.Tensor, layout: str, name: str, op: str) -> torch.Tensor:
    if layout not in ("bhsd", "bshd", "packed"):
        raise ValueError(
            f"vlmkern.{op}: layout must be 'bhsd', 'bshd' or 'packed', got {layout!r}"
        )
    if t.dim() == 3:  # packed (N, H, D): any layout name (the default is 'bhsd')
        return t.unsqueeze(0)
    if layout == "packed":
        raise ValueError(
            f"vlmkern.{op}: layout='packed' needs (N, H, D) {name}, got shape {tuple(t.shape)}"
        )
    if t.dim() != 4:
        raise ValueError(
            f"vlmkern.{op}: {name} must be (B, H, S, D), (B, S, H, D) or packed (N, H, D), got "
            f"{t.dim()}-D of shape {tuple(t.shape)}"
        )
    return t.transpose(1, 2) if layout == "bhsd" else t


def _from_bshd(t: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    if like.dim() == 3:
        return t.squeeze(0)
    return t.transpose(1, 2) if layout == "bhsd" else t


def _positions_abs(positions: torch.Tensor, axes: int, packed: bool, op: str) -> torch.Tensor:
    """(A, B, S) view of positions given as (A, B, S) / (B, S) or, packed, (A, N) / (N,)."""
    if axes == 1 and positions.dim() == (1 if packed else 2):
        positions = positions.unsqueeze(0)
    elif axes == 3 and not packed and positions.dim() == 2:  # text only: HF expands (B, S)
        positions = positions.unsqueeze(0).expand(3, -1, -1)
    elif positions.dim() != (2 if packed else 3) or positions.shape[0] != axes:
        shape = {(1, True): "(N,)", (1, False): "(B, S)", (3, True): "(3, N)",
                 (3, False): "(3, B, S) or (B, S)"}[(axes, packed)]
        raise ValueError(
            f"vlmkern.{op}: positions must be {shape} for this q layout, got shape "
            f"{tuple(positions.shape)}"
        )
    return positions.unsqueeze(1) if packed else positions


def _apply(op: str, q, k, pos_abs, table, scale, layout, inplace=False):
    inv_freq, freq_axis = table
    q4, k4 = _to_bshd(q, layout, "q", op), _to_bshd(k, layout, "k", op)
    if inplace:
        torch.ops.vlmkern.rope_(q4, k4, pos_abs, list(inv_freq), list(freq_axis), scale)
        return q, k
    qo, ko = torch.ops.vlmkern.rope(q4, k4, pos_abs, list(inv_freq), list(freq_axis), scale)
    return _from_bshd(qo, q, layout), _from_bshd(ko, k, layout)


# ---- public API ----------------------------------------------------------------------------------


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    theta: float = 10000.0,
    rotary_dim: int | None = None,
    layout: str = "bhsd",
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain 1D RoPE (Llama / Qwen2 text), HF ``apply_rotary_pos_emb`` semantics.

    Args:
        q, k: ``(B, Hq|Hk, S, D)`` (``layout="bhsd"``, HF attention layout), ``(B, S, H, D)``
            (``"bshd"``) or packed ``(N, H, D)`` (``"packed"``, or any layout name); any
            strides (e.g. slices of a fused qkv); fp32 / fp16 / bf16 / fp64; GQA (Hq ≠ Hk).
        positions: int32/int64 ``(B, S)``, or ``(N,)`` for packed q/k.
        theta: RoPE base. rotary_dim: rotated dims (default D; partial rotary leaves the rest).
        scale: multiplies cos and sin (HF ``attention_scaling``).

    Returns:
        ``(q_rot, k_rot)``, new tensors with the inputs' shapes, dtypes and (dense) layouts.
        Differentiable in q and k.
    """
    rotary_dim = q.shape[-1] if rotary_dim is None else rotary_dim
    pos = _positions_abs(positions, 1, q.dim() == 3, "rope")
    return _apply("rope", q, k, pos, rope_table(rotary_dim, float(theta)), scale, layout)


def vision_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL / 2.5-VL / 3-VL vision-tower 2D RoPE (HF ``apply_rotary_pos_emb_vision``).

    Args:
        q, k: packed tokens ``(N, Hq, D)``, ``(N, Hk, D)`` of any number of images; any strides.
            D divisible by 4 (80 for Qwen2-VL, 72 for Qwen3-VL).
        positions: int ``(N, 2)`` per-token (h, w) patch coordinates (merge-block order).
        theta: RoPE base (10000 in every Qwen ViT).

    Angles are fp32 ``h·inv_freq`` / ``w·inv_freq`` in HF's ``[f_h, f_w, f_h, f_w]`` layout, the
    rotation is done in fp32 and cast back (HF upcasts q and k). Returns new ``(q_rot, k_rot)``.
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"vlmkern.vision_rope: q and k must be packed (N, H, D), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    if positions.dim() != 2 or positions.shape[1] != 2:
        raise ValueError(
            f"vlmkern.vision_rope: positions must be (N, 2) (h, w), got {tuple(positions.shape)}"
        )
    pos = positions.t().unsqueeze(1)  # (2, 1, N) view
    return _apply("vision_rope", q, k, pos, vision_rope_table(q.shape[-1], float(theta)), 1.0,
                  "bshd")


def mrope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    mrope_section: Sequence[int],
    theta: float = 1000000.0,
    interleaved: bool = False,
    rotary_dim: int | None = None,
    layout: str = "bhsd",
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal RoPE of the Qwen2-VL family LLM (HF ``Qwen2VLRotaryEmbedding`` +
    ``apply_rotary_pos_emb``).

    Args:
        q, k: ``(B, Hq|Hk, S, D)`` (``layout="bhsd"``), ``(B, S, H, D)`` (``"bshd"``) or packed
            ``(N, H, D)``; any strides; GQA allowed.
        positions: int ``(3, B, S)`` (t, h, w), or ``(3, N)`` for packed q/k.
        mrope_section: e.g. ``[16, 24, 24]`` (Qwen2-VL / 2.5-VL) or ``[24, 20, 20]`` (Qwen3-VL);
            sums to ``rotary_dim / 2``.
        interleaved: False = sectioned (frequencies 0–15 → t, 16–39 → h, 40–63 → w);
            True = Qwen3-VL's t, h, w, t, h, w, … interleave.
        theta, rotary_dim, scale: as in :func:`rope`.

    Returns new ``(q_rot, k_rot)``; differentiable. Math in fp32, rounded once to the input dtype
    (HF rounds cos/sin to the model dtype first: results agree within the G3 error rule).
    """
    return _mrope("mrope", q, k, positions, mrope_section, theta, interleaved, rotary_dim, layout,
                  scale, inplace=False)


def mrope_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    mrope_section: Sequence[int],
    theta: float = 1000000.0,
    interleaved: bool = False,
    rotary_dim: int | None = None,
    layout: str = "bhsd",
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place :func:`mrope` (inference: not differentiable). Returns ``(q, k)``, rotated."""
    return _mrope("mrope_", q, k, positions, mrope_section, theta, interleaved, rotary_dim, layout,
                  scale, inplace=True)


def _mrope(op, q, k, positions, mrope_section, theta, interleaved, rotary_dim, layout, scale,
           inplace):
    rotary_dim = q.shape[-1] if rotary_dim is None else rotary_dim
    table = mrope_table(tuple(int(s) for s in mrope_section), float(theta), bool(interleaved),
                        rotary_dim)
    pos = _positions_abs(positions, 3, q.dim() == 3, op)
    return _apply(op, q, k, pos, table, scale, layout, inplace=inplace)


def apply_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for HF's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` (text models).

    Args:
        q, k: ``(B, H, S, D)`` for ``unsqueeze_dim=1``, ``(B, S, H, D)`` for ``unsqueeze_dim=2``;
            any strides; fp32 / fp16 / bf16 / fp64.
        cos, sin: ``(B or 1, S, R)`` or ``(S, R)`` with ``R ≤ D`` even (HF passes ``R = D``);
            the first R dims are rotated, the rest pass through.

    ``x·cos + rotate_half(x)·sin`` in fp32 (HF does it in the model dtype), one rounding; fp64
    q and k are rotated in fp64, but cos and sin are read as fp32 (an fp64 table is rounded).
    Differentiable in q and k; cos and sin are treated as constants.
    """
    if unsqueeze_dim not in (1, 2):
        raise ValueError(
            f"vlmkern.apply_rotary_pos_emb: unsqueeze_dim must be 1 (B, H, S, D) or 2 "
            f"(B, S, H, D), got {unsqueeze_dim}"
        )
    layout = "bhsd" if unsqueeze_dim == 1 else "bshd"
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    q4, k4 = _to_bshd(q, layout, "q", "apply_rotary_pos_emb"), _to_bshd(k, layout, "k",
                                                                          "apply_rotary_pos_emb")
    qo, ko = torch.ops.vlmkern.rope_cos_sin(q4, k4, cos, sin)
    return _from_bshd(qo, q, layout), _from_bshd(ko, k, layout)


def apply_rotary_pos_emb_vision(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for HF's ``apply_rotary_pos_emb_vision`` (Qwen2-VL family ViT).

    Args:
        q, k: packed ``(N, H, D)``; cos, sin: ``(N, R)`` (HF: fp32, ``R = D``).

    Rotation in fp32, cast back to q's dtype, as HF does. Differentiable in q and k.
    """
    if q.dim() != 3 or k.dim() != 3 or cos.dim() != 2:
        raise ValueError(
            f"vlmkern.apply_rotary_pos_emb_vision: q, k must be (N, H, D) and cos, sin (N, R), "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}"
        )
    qo, ko = torch.ops.vlmkern.rope_cos_sin(
        q.unsqueeze(0), k.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0)
    )
    return qo.squeeze(0), ko.squeeze(0)


# ---- fake kernels: the checks and messages of csrc/common/rope.cpp -------------------------------


def _check_qk(op, q, k) -> None:
    check_rank(q, 4, op, "q", "(B, S, Hq, D)")
    check_rank(k, 4, op, "k", "(B, S, Hk, D)")
    torch._check(
        q.dtype in _FLOATS,
        lambda: f"vlmkern.{op}: q must be float32, float16, bfloat16 or float64, got {q.dtype}",
    )
    torch._check(
        k.dtype == q.dtype,
        lambda: f"vlmkern.{op}: k dtype {k.dtype} differs from q dtype {q.dtype}",
    )
    torch._check(
        k.device == q.device,
        lambda: f"vlmkern.{op}: q and k must be on one device, got q on {q.device}, k on "
        f"{k.device}",
    )
    torch._check(
        k.shape[0] == q.shape[0] and k.shape[1] == q.shape[1] and k.shape[3] == q.shape[3],
        lambda: f"vlmkern.{op}: k shape {list(k.shape)} does not match q shape {list(q.shape)} "
        "in B, S or D",
    )
    torch._check(
        (q.shape[2] + k.shape[2]) * q.shape[3] <= 2**31 - 1,
        lambda: f"vlmkern.{op}: one token's q and k heads hold (Hq + Hk) * D = "
        f"{(q.shape[2] + k.shape[2]) * q.shape[3]} elements; at most 2^31 - 1 are supported",
    )


def _check(op, q, k, positions, inv_freq, freq_axis) -> None:
    _check_qk(op, q, k)
    check_rank(positions, 3, op, "positions", "(A, B, S)")
    torch._check(
        positions.dtype in (torch.int32, torch.int64),
        lambda: f"vlmkern.{op}: positions must be int32 or int64, got {positions.dtype}",
    )
    torch._check(
        positions.device == q.device,
        lambda: f"vlmkern.{op}: positions must be on the device of q, got q on {q.device}, "
        f"positions on {positions.device}",
    )
    b, s, _, d = q.shape
    torch._check(
        positions.shape[1] == b and positions.shape[2] == s,
        lambda: f"vlmkern.{op}: positions shape {list(positions.shape)} must be (A, {b}, {s}) to "
        "match q",
    )
    axes = positions.shape[0]
    torch._check(1 <= axes <= 127,
                 lambda: f"vlmkern.{op}: positions must have 1..127 axes, got {axes}")
    half = len(inv_freq)
    torch._check(
        1 <= half <= _MAX_FREQS,
        lambda: f"vlmkern.{op}: inv_freq must have 1..{_MAX_FREQS} entries, got {half}",
    )
    torch._check(
        2 * half <= d,
        lambda: f"vlmkern.{op}: rotary_dim = 2 * len(inv_freq) = {2 * half} exceeds head dim "
        f"D={d}",
    )
    torch._check(
        len(freq_axis) == half,
        lambda: f"vlmkern.{op}: freq_axis has {len(freq_axis)} entries but inv_freq has {half}",
    )
    for f, a in enumerate(freq_axis):
        torch._check(
            0 <= a < axes,
            lambda f=f, a=a: f"vlmkern.{op}: freq_axis[{f}] = {a} is not a valid axis of "
            f"positions (A={axes})",
        )


def _check_cos_sin(op, q, k, cos, sin) -> None:
    _check_qk(op, q, k)
    check_rank(cos, 3, op, "cos", "(B, S, R)")
    check_rank(sin, 3, op, "sin", "(B, S, R)")
    torch._check(
        cos.dtype in _FLOATS,
        lambda: f"vlmkern.{op}: cos must be float32, float16, bfloat16 or float64, got "
        f"{cos.dtype}",
    )
    torch._check(
        sin.dtype == cos.dtype,
        lambda: f"vlmkern.{op}: sin dtype {sin.dtype} differs from cos dtype {cos.dtype}",
    )
    torch._check(
        cos.device == q.device and sin.device == q.device,
        lambda: f"vlmkern.{op}: cos and sin must be on the device of q, got q on {q.device}, "
        f"cos on {cos.device}, sin on {sin.device}",
    )
    torch._check(
        cos.shape == sin.shape,
        lambda: f"vlmkern.{op}: cos shape {list(cos.shape)} differs from sin {list(sin.shape)}",
    )
    b, s, _, d = q.shape
    torch._check(
        (cos.shape[0] == b or cos.shape[0] == 1) and cos.shape[1] == s,
        lambda: f"vlmkern.{op}: cos shape {list(cos.shape)} must be ({b} or 1, {s}, R)",
    )
    r = cos.shape[2]
    torch._check(
        r >= 2 and r % 2 == 0 and r <= d and r <= 2 * _MAX_FREQS,
        lambda: f"vlmkern.{op}: cos last dim R={r} must be even, in [2, min(D={d}, "
        f"{2 * _MAX_FREQS})]",
    )


@torch.library.register_fake("vlmkern::rope_cos_sin")
def _rope_cos_sin_fake(q, k, cos, sin):
    _check_cos_sin("rope_cos_sin", q, k, cos, sin)
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.register_fake("vlmkern::rope_cos_sin_backward")
def _rope_cos_sin_backward_fake(grad_q, grad_k, cos, sin):
    _check_cos_sin("rope_cos_sin_backward", grad_q, grad_k, cos, sin)
    return torch.empty_like(grad_q), torch.empty_like(grad_k)


@torch.library.register_fake("vlmkern::rope")
def _rope_fake(q, k, positions, inv_freq, freq_axis, scale=1.0):
    _check("rope", q, k, positions, inv_freq, freq_axis)
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.register_fake("vlmkern::rope_backward")
def _rope_backward_fake(grad_q, grad_k, positions, inv_freq, freq_axis, scale=1.0):
    _check("rope_backward", grad_q, grad_k, positions, inv_freq, freq_axis)
    return torch.empty_like(grad_q), torch.empty_like(grad_k)


@torch.library.register_fake("vlmkern::rope_")
def _rope_inplace_fake(q, k, positions, inv_freq, freq_axis, scale=1.0):
    _check("rope_", q, k, positions, inv_freq, freq_axis)


# ---- autograd: the backward is the rotation by -angle (rope_backward) ---------------------------


def _rope_setup(ctx, inputs, output) -> None:
    _, _, positions, inv_freq, freq_axis, scale = inputs
    ctx.save_for_backward(positions)
    ctx.table = (inv_freq, freq_axis, scale)


def _rope_grad(ctx, grad_q, grad_k):
    (positions,) = ctx.saved_tensors
    inv_freq, freq_axis, scale = ctx.table
    gq, gk = torch.ops.vlmkern.rope_backward(grad_q, grad_k, positions, inv_freq, freq_axis, scale)
    return gq, gk, None, None, None, None


def _rope_backward_grad(ctx, grad_q, grad_k):
    (positions,) = ctx.saved_tensors
    inv_freq, freq_axis, scale = ctx.table
    gq, gk = torch.ops.vlmkern.rope(grad_q, grad_k, positions, inv_freq, freq_axis, scale)
    return gq, gk, None, None, None, None


def _cos_sin_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[2], inputs[3])


def _cos_sin_grad(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    gq, gk = torch.ops.vlmkern.rope_cos_sin_backward(grad_q, grad_k, cos, sin)
    return gq, gk, None, None  # cos and sin are constants (HF builds them under no_grad)


def _cos_sin_backward_grad(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    gq, gk = torch.ops.vlmkern.rope_cos_sin(grad_q, grad_k, cos, sin)
    return gq, gk, None, None


torch.library.register_autograd("vlmkern::rope", _rope_grad, setup_context=_rope_setup)


# rope_ is inference only: its Autograd kernel refuses inputs that require grad (instead of
# silently leaving the rotation out of the graph), and its ADInplaceOrView kernel bumps the
# version counters of q and k so autograd notices the mutation of any saved tensor.
_lib = torch.library.Library("vlmkern", "IMPL")


def _rope_inplace_autograd(q, k, positions, inv_freq, freq_axis, scale=1.0):
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError(
            "vlmkern.rope_: the in-place RoPE is not differentiable and q or k requires grad; "
            "use the out-of-place op (vlmkern.ops.mrope / rope) or run under torch.no_grad()"
        )
    with torch._C._AutoDispatchBelowAutograd():
        torch.ops.vlmkern.rope_(q, k, positions, inv_freq, freq_axis, scale)


def _rope_inplace_bump_versions(q, k, positions, inv_freq, freq_axis, scale=1.0):
    with torch._C._AutoDispatchBelowADInplaceOrView():
        torch.ops.vlmkern.rope_(q, k, positions, inv_freq, freq_axis, scale)
    torch.autograd.graph.increment_version((q, k))


_lib.impl("rope_", _rope_inplace_autograd, "Autograd")
_lib.impl("rope_", _rope_inplace_bump_versions, "ADInplaceOrView")
torch.library.register_autograd(
    "vlmkern::rope_cos_sin", _cos_sin_grad, setup_context=_cos_sin_setup
)
torch.library.register_autograd(
    "vlmkern::rope_cos_sin_backward", _cos_sin_backward_grad, setup_context=_cos_sin_setup
)
torch.library.register_autograd(
    "vlmkern::rope_backward", _rope_backward_grad, setup_context=_rope_setup
)
