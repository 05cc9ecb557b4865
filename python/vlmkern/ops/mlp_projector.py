"""MLP projector (the VLM connector): optional pixel shuffle or Qwen 2×2 merge, LayerNorm / RMSNorm,
``Linear → activation → Linear``, as one op with backward. Public wrapper, fake (meta) kernels and
autograd for ``torch.ops.vlmkern.mlp_projector`` / ``mlp_projector_backward``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._autocast import register_autocast
from ._checks import check_rank
from .pixel_shuffle import _check_grid

_OP = "vlmkern.mlp_projector"
_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "none")
_NORMS = ("none", "layernorm", "rmsnorm")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_SCALE = 1 << 20  # kMaxScale in csrc/common/pixel_shuffle.h
# c10's names for dtypes, as the C++ checks print them.
_C10_NAMES = {
    torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.float64: "Double", torch.int32: "Int", torch.int64: "Long", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
}  # fmt: skip


def mlp_projector(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    activation: str = "gelu",
    norm: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    norm_position: str = "pre",
    shuffle: int | None = None,
    merge: int | None = None,
    grid: Sequence[int] | None = None,
) -> torch.Tensor:
    """``act(norm(rows(x)) @ w1ᵀ + b1) @ w2ᵀ + b2``, the connector of LLaVA, InternVL, Qwen-VL,
    Idefics3 / SmolVLM, PaliGemma and Mllama, matching HF's modules given the same weights.

    Args:
        x: the vision features, fp32 / fp16 / bf16 / fp64, any strides (``feats[:, 1:]`` is read
            without a copy when shuffled). Its rows, K features each, depend on the mode:
            no ``shuffle`` / ``merge``: ``(..., K)``, one row per token (LLaVA, PaliGemma, Mllama);
            ``shuffle=r``: ``(B, H, W, C)``, or ``(B, N, C)`` with ``grid=(H, W)``; each r×r block
            of tokens becomes one row of ``K = r²C`` features in InternVL / Idefics3 order
            (see :func:`vlmkern.ops.pixel_shuffle`);
            ``merge=s``: ``(..., C)``, every ``s²`` consecutive tokens form one row of ``K = s²C``
            (Qwen2-VL / 2.5-VL / 3-VL's ``x.view(-1, 4C)``).
        w1, b1: first Linear, ``(N1, K)`` and ``(N1,)`` or None.
        w2, b2: second Linear, ``(D, N1)`` and ``(D,)``, or None for a single-Linear connector
            (Idefics3 / SmolVLM without bias, PaliGemma / Mllama with); then ``D = N1``.
        activation: ``"gelu"`` (exact erf, HF's ``"gelu"``), ``"gelu_tanh"``, ``"quick_gelu"``
            (``x·sigmoid(1.702x)``) or ``"none"``; applied to the first Linear's output.
        norm: None, ``"layernorm"`` (``norm_weight`` required, ``norm_bias`` optional) or
            ``"rmsnorm"`` (Qwen2RMSNorm: statistics in fp32, ``weight * x̂.to(dtype)``; weight only).
        eps: the norm's epsilon (InternVL 1e-5; Qwen mergers 1e-6).
        norm_position: ``"pre"``: over the C features of each input token, before the shuffle /
            merge (Qwen2-VL, Qwen2.5-VL, Qwen3-VL's main merger); ``"post"``: over the K features
            of each row after it (InternVL, Qwen3-VL DeepStack mergers). Same thing without one.
        shuffle: pixel-shuffle factor r (None, 0 or 1: none). merge: Qwen spatial merge size s.
        grid: ``(H, W)`` when ``shuffle`` is set and x is 3-D.

    Returns:
        ``(..., D)`` for plain rows; ``(B, H/r, W/r, D)`` (or ``(B, N/r², D)`` with ``grid``) for a
        shuffle; ``(T/s², D)`` for a merge of T tokens. Contiguous, x's dtype and device.
        Differentiable in x, the weights, the biases and the norm's parameters.

    CUDA GEMMs: the environment variable ``VLMKERN_PROJECTOR_GEMM`` (read on every call) picks them.
    ``"aten"`` — **the default** until a GPU session has validated the other path — runs both
    Linears on cuBLAS (``addmm``) and the activation as an ATen kernel. ``"cutlass"`` runs them on
    vlmkern's fused CUTLASS kernel (Hopper, compute capability 9.0; builds with the
    ``nvidia-cutlass`` headers): GEMM1 + b1 + erf GELU in one epilogue that also writes the returned
    pre-activation ``hidden``, GEMM2 + b2 likewise (other activations: GEMM + bias fused, then
    ATen's activation). Inputs it cannot take fall back to the ATen path per GEMM: fp32 / fp64,
    another GPU, K or N not a multiple of 8, rows not 16-byte aligned or a non-unit column stride,
    non-contiguous weights. ``"cutlass_wide"`` does the same on 128 x 256 tiles,
    ``"cutlass_pingpong"`` runs only GEMM1 + GELU on a pingpong-scheduled kernel (both unmeasured
    candidates for a GPU sweep); ``"cutlass_sm80"`` runs both on a CUTLASS 2.x kernel with the same
    epilogue for any compute capability 8.0+ GPU (A100 class; not yet run on a GPU). The backward
    runs on cuBLAS and ATen's elementwise kernels, except that ``VLMKERN_PROJECTOR_DGELU=fused``
    (off by default, not yet run on a GPU) computes the exact GELU's derivative in the epilogue of
    the GEMM that gives the second Linear's input gradient: ``dh = gelu'(hidden) * (grad_out @ w2)``
    in one sm_90a CUTLASS kernel that reads ``hidden`` as an auxiliary input and ``w2`` as stored
    (fp16 / bf16, ``D`` and ``N1`` multiples of 8; else the cuBLAS + ``gelu_backward`` path).
    ``VLMKERN_PROJECTOR_SHUFFLE_GEMM=fused`` (off by default, not yet run on a GPU) runs a
    shuffled projector's GEMM1 (Idefics3 / SmolVLM; InternVL with its LayerNorm) as one sm_90a
    kernel that reads its rows through the shuffle's index map (no shuffled copy), and Qwen's
    mergers' GEMM1 on the merged rows; a norm is applied to the GEMM's A tiles in shared memory
    from a statistics pass (no normalized copy): fp16 / bf16, C a multiple of 8, 16-byte aligned
    token rows, else the copy + cuBLAS path; it takes GEMM1 over from
    ``VLMKERN_PROJECTOR_GEMM=cutlass*`` (the activation then runs in ATen).
    ``VLMKERN_PROJECTOR_SHUFFLE_NORM=aten`` turns InternVL's one-kernel shuffle + LayerNorm off
    (for comparison).
    """
    for name, value, allowed in (
        ("activation", activation, _ACTIVATIONS),
        ("norm", "none" if norm is None else norm, _NORMS),
        ("norm_position", norm_position, ("pre", "post")),
    ):
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ValueError(f"{_OP}: {name} must be one of {choices}; got {value!r}")
    r = _factor(shuffle, "shuffle")
    s = _factor(merge, "merge")
    args = (activation, norm or "none", norm_position, float(eps), r, s)
    if grid is not None:
        if r <= 1:
            raise ValueError(f"{_OP}: grid={tuple(grid)} is only used with shuffle > 1")
        height, width = _check_grid(x, grid, "mlp_projector", "x")
        if height % r or width % r:
            raise ValueError(f"{_OP}: grid {tuple(grid)} is not divisible by shuffle={r}")
        batch = x.shape[0]
        x4 = x.view(batch, height, width, x.shape[-1])
        out = torch.ops.vlmkern.mlp_projector(x4, w1, b1, w2, b2, norm_weight, norm_bias, *args)
        return out[0].flatten(1, 2)  # (B, h·w, D); not view(B, -1, D): B may be 0
    if r > 1 and x.dim() == 3:
        raise ValueError(f"{_OP}: x is 3-D (B, N, C) with shuffle={r}; pass grid=(H, W)")
    return torch.ops.vlmkern.mlp_projector(x, w1, b1, w2, b2, norm_weight, norm_bias, *args)[0]


def _factor(value: int | None, name: str) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{_OP}: {name} must be None or an int >= 0, got {value!r}")
    return max(value, 1)


# ---- fake (meta) kernels: the checks and messages of csrc/common/mlp_projector_checks.cpp ------


def _check(cond, msg: str, op: str = _OP) -> None:
    torch._check(cond, lambda: f"{op}: {msg}")


def _like_x(t: torch.Tensor, x: torch.Tensor, name: str, op: str = _OP) -> None:
    _check(t.dtype == x.dtype, f"{name} has dtype {_name(t.dtype)} but x has {_name(x.dtype)}", op)
    _check(t.device == x.device, f"{name} is on {t.device} but x is on {x.device}", op)


def _vector(t: torch.Tensor, n, name: str, what: str) -> None:
    _check(
        t.dim() == 1 and t.shape[0] == n,
        f"{name} must have shape ({n},) {what}, got {list(t.shape)}",
    )


def _name(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _parse(activation: str, norm: str, norm_position: str, eps: float, shuffle: int, merge: int):
    _check(
        activation in _ACTIVATIONS,
        "activation must be one of 'gelu', 'gelu_tanh', 'quick_gelu', 'none'; "
        f"got '{activation}'",
    )
    _check(norm in _NORMS, f"norm must be one of 'none', 'layernorm', 'rmsnorm'; got '{norm}'")
    _check(
        norm_position in ("pre", "post"),
        f"norm_position must be 'pre' or 'post'; got '{norm_position}'",
    )
    _check(eps >= 0 and eps != float("inf"), f"eps must be a finite number >= 0, got {eps}")
    _check(0 <= shuffle <= _MAX_SCALE, f"shuffle must be in [0, {_MAX_SCALE}], got {shuffle}")
    _check(0 <= merge <= _MAX_SCALE, f"merge must be in [0, {_MAX_SCALE}], got {merge}")
    _check(
        shuffle <= 1 or merge <= 1,
        f"shuffle={shuffle} and merge={merge} cannot both be > 1",
    )
    return max(shuffle, 1), max(merge, 1)


def _shape(x, w1, b1, w2, b2, nw, nb, norm, norm_position, r, s):
    """Mirror of check_mlp_projector: returns (m, n1, d, groups, features, out_sizes)."""
    _check(
        x.dtype in _FLOATS,
        "x must be a floating-point tensor (float32, float16, bfloat16 or float64), got "
        f"{_name(x.dtype)}",
    )
    check_rank(w1, 2, "mlp_projector", "w1", "(N1, K)")
    _like_x(w1, x, "w1")
    n1, k = w1.shape
    _check(k >= 1, f"w1 must have at least one input feature (K >= 1), got shape {list(w1.shape)}")
    if b1 is not None:
        _like_x(b1, x, "b1")
        _vector(b1, n1, "b1", "(N1 = rows of w1)")
    d = n1
    if w2 is not None:
        check_rank(w2, 2, "mlp_projector", "w2", "(D, N1)")
        _like_x(w2, x, "w2")
        _check(
            w2.shape[1] == n1,
            f"w2 must have shape (D, N1) with N1 = {n1} (rows of w1), got {list(w2.shape)}",
        )
        d = w2.shape[0]
    if b2 is not None:
        _check(
            w2 is not None,
            "b2 is given but w2 is None (a single-Linear projector has its bias in b1)",
        )
        _like_x(b2, x, "b2")
        _vector(b2, d, "b2", "(D = rows of w2)")
    factor = r if r > 1 else s
    if r > 1:
        check_rank(x, 4, "mlp_projector", "x", "(B, H, W, C) when shuffle > 1")
        b, h, w, c = x.shape
        _check(h % r == 0, f"x height H={h} is not divisible by shuffle={r}")
        _check(w % r == 0, f"x width W={w} is not divisible by shuffle={r}")
        _check(
            c * r * r == k,
            f"x channels C={c} times shuffle*shuffle={r * r} must equal K={k} (columns of w1)",
        )
        m = b * (h // r) * (w // r)
        out_sizes = [b, h // r, w // r, d]
    elif s > 1:
        _check(x.dim() >= 1, "x must have at least 1 dim (..., C), got a 0-D tensor")
        c = x.shape[-1]
        _check(
            c * s * s == k,
            f"x channels C={c} times merge*merge={s * s} must equal K={k} (columns of w1)",
        )
        tokens = x.numel() // c
        _check(
            tokens % (s * s) == 0,
            f"x has {tokens} tokens, not divisible by merge*merge={s * s}",
        )
        m = tokens // (s * s)
        out_sizes = [m, d]
    else:
        _check(x.dim() >= 1, "x must have at least 1 dim (..., K), got a 0-D tensor")
        c = x.shape[-1]
        _check(c == k, f"x has {c} features (last dim) but w1 has K={k} (columns)")
        m = x.numel() // k
        out_sizes = [*x.shape[:-1], d]
    grouped = norm_position == "pre" and factor > 1
    groups, features = (factor * factor, c) if grouped else (1, k)
    if norm == "none":
        _check(nw is None, "norm_weight is given but norm='none'")
        _check(nb is None, "norm_bias is given but norm='none'")
    else:
        _check(nw is not None, f"norm='{norm}' needs norm_weight")
        _check(
            nb is None or norm == "layernorm", "norm_bias is given but norm='rmsnorm' has no bias"
        )
        what = (
            "(the K features after the shuffle / merge)"
            if norm_position == "post"
            else "(the C features of x, norm_position='pre')"
        )
        _like_x(nw, x, "norm_weight")
        _vector(nw, features, "norm_weight", what)
        if nb is not None:
            _like_x(nb, x, "norm_bias")
            _vector(nb, features, "norm_bias", what)
    return m, n1, d, groups, features, out_sizes


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("vlmkern::mlp_projector")
def _mlp_projector_fake(
    x, w1, b1, w2, b2, norm_weight, norm_bias, activation, norm, norm_position, eps, shuffle, merge
):
    r, s = _parse(activation, norm, norm_position, eps, shuffle, merge)
    m, n1, _, groups, _, out_sizes = _shape(
        x, w1, b1, w2, b2, norm_weight, norm_bias, norm, norm_position, r, s
    )
    out = x.new_empty(out_sizes)
    keep_h = w2 is not None or activation != "none"
    hidden = x.new_empty((m, n1) if keep_h else (0,))
    act = x.new_empty((m, n1) if w2 is not None and activation != "none" else (0,))
    st = _stat_dtype(x)
    rstd = x.new_empty((m, groups) if norm != "none" else (0,), dtype=st)
    mean = x.new_empty((m, groups) if norm == "layernorm" else (0,), dtype=st)
    return out, hidden, act, mean, rstd


def _check_saved(grad_out, hidden, act, mean, rstd, x, sizes, activation, norm, has_w2) -> None:
    """check_projector_saved's checks: the forward's saved outputs as the backward needs them."""
    m, n1, out_sizes, groups = sizes
    op = "vlmkern.mlp_projector_backward"
    _like_x(grad_out, x, "grad_out", op)
    _check(list(grad_out.shape) == list(out_sizes),
           f"grad_out must have the output's shape {list(out_sizes)}, got {list(grad_out.shape)}",
           op)  # fmt: skip
    _like_x(hidden, x, "hidden", op)
    h_sizes = [m, n1] if has_w2 or activation != "none" else [0]
    _check(list(hidden.shape) == h_sizes,
           f"hidden must have shape {h_sizes}, got {list(hidden.shape)}", op)  # fmt: skip
    _like_x(act, x, "act", op)
    act_ok = list(act.shape) == [0] or (
        has_w2 and activation != "none" and list(act.shape) == [m, n1])
    _check(act_ok, f"act must have shape [{m}, {n1}] (two Linears with an activation) or [0], "
           f"got {list(act.shape)}", op)  # fmt: skip
    st = _stat_dtype(x)
    for t, name, has in ((mean, "mean", norm == "layernorm"), (rstd, "rstd", norm != "none")):
        _check(t.dtype == st and t.device == x.device,
               f"{name} must be {_name(st)} on {x.device}, got {_name(t.dtype)} on {t.device}",
               op)  # fmt: skip
        want = [m, groups] if has else [0]
        _check(list(t.shape) == want, f"{name} must have shape {want}, got {list(t.shape)}", op)


@torch.library.register_fake("vlmkern::mlp_projector_backward")
def _mlp_projector_backward_fake(
    grad_out, x, w1, w2, norm_weight, norm_bias, hidden, act, mean, rstd, activation, norm,
    norm_position, eps, shuffle, merge, output_mask,
):  # fmt: skip
    r, s = _parse(activation, norm, norm_position, eps, shuffle, merge)
    m, n1, d, groups, features, out_sizes = _shape(
        x, w1, None, w2, None, norm_weight, norm_bias, norm, norm_position, r, s
    )
    _check_saved(grad_out, hidden, act, mean, rstd, x, (m, n1, out_sizes, groups),
                 activation, norm, w2 is not None)  # fmt: skip
    has_norm = norm != "none"
    shapes = [
        tuple(x.shape), tuple(w1.shape), (n1,),
        (d, n1) if w2 is not None else None, (d,) if w2 is not None else None,
        (features,) if has_norm else None, (features,) if norm == "layernorm" else None,
    ]  # fmt: skip
    return tuple(
        x.new_empty(shape) if want and shape is not None else None
        for want, shape in zip(output_mask, shapes, strict=True)
    )


# ---- autograd: the backward op computes every gradient in one call ----------------------------


def _setup(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2, nw, nb, *options = inputs
    _, hidden, act, mean, rstd = output
    ctx.mark_non_differentiable(hidden, act, mean, rstd)
    ctx.save_for_backward(x, w1, w2, nw, nb, hidden, act, mean, rstd)
    ctx.options = options


def _backward(ctx, grad_out, _grad_hidden, _grad_act, _grad_mean, _grad_rstd):
    x, w1, w2, nw, nb, hidden, act, mean, rstd = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:7])
    grads = torch.ops.vlmkern.mlp_projector_backward(
        grad_out, x, w1, w2, nw, nb, hidden, act, mean, rstd, *ctx.options, mask
    )
    return (*grads, None, None, None, None, None, None)


def _no_setup(ctx, inputs, output) -> None:
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError(f"{_OP}: double backward (gradients of gradients) is not supported")


torch.library.register_autograd("vlmkern::mlp_projector", _backward, setup_context=_setup)
torch.library.register_autograd(
    "vlmkern::mlp_projector_backward", _no_double_backward, setup_context=_no_setup
)
register_autocast("mlp_projector")
