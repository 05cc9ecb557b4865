"""Cross-attention modules over vlmkern.ops.cross_attention with HF state-dict names: Mllama's
``MllamaTextCrossAttention`` and ``MllamaCrossAttentionDecoderLayer`` (tanh-gated), and BLIP-2's
``Blip2QFormerMultiHeadAttention`` / ``Blip2QFormerAttention`` (learned queries shared by the
batch are projected once and broadcast, never copied)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.cross_attention import CUDA_DTYPES, CUDA_HEAD_DIMS, cross_attention, mllama_kv_ranges
from ..ops.gated_linear import gated_linear
from ._fusable import fusable


class MllamaTextRMSNorm(nn.Module):
    """HF's ``MllamaTextRMSNorm``: normalize in fp32, cast back, scale by ``weight``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dt)


def _cfg(config, name, default=None):
    return getattr(config, name, default) if config is not None else default


def _gated_residual(linear: nn.Module, x: torch.Tensor, gate: torch.Tensor,
                    residual: torch.Tensor) -> torch.Tensor:
    """``residual + tanh(gate) · linear(x)``: one :func:`gated_linear` (the gate and residual in
    the GEMM's epilogue) for a plain ``nn.Linear``; a replaced or hooked module (a PEFT / LoRA
    wrapper, a quantized Linear, forward hooks) is called as a module, so it keeps its behaviour;
    so is every Linear under torch.autocast, where HF's residual stream stays in fp32 while the op
    would take the region's dtype."""
    if fusable(linear) and not torch.is_autocast_enabled(x.device.type):
        return gated_linear(x, linear.weight, gate, residual, linear.bias)
    return residual + gate.tanh() * linear(x)


def _need_keys(module: str, cross_attention_states: torch.Tensor | None,
               kv: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Raise the ValueError of HF's drop-in layer when neither image states nor keys come."""
    if cross_attention_states is None and kv is None:
        raise ValueError(f"vlmkern: {module} needs cross_attention_states or kv=(k, v), this "
                         "layer's image keys and values (from project_kv)")


def _sdpa_with_ranges(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      kv_ranges: torch.Tensor | None, masked_rows: str) -> torch.Tensor:
    """The op's function by torch SDPA with a boolean mask built from the ranges: what runs on
    CUDA where the op's kernels do not (fp32, head dims outside CUDA_HEAD_DIMS).
    q (B, Hq, S, D), k / v (B, Hk, L, D), kv_ranges (B, S, R, 2) -> (B, Hq, S, D)."""
    mask = dead = None
    if kv_ranges is not None:
        keys = torch.arange(k.shape[2], device=k.device)
        lo, hi = kv_ranges[..., 0, None], kv_ranges[..., 1, None]  # (B, S, R, 1)
        vis = ((keys >= lo) & (keys < hi)).any(-2)  # (B, S, L)
        dead = ~vis.any(-1, keepdim=True)  # (B, S, 1): rows that see no key
        mask = (vis | dead).unsqueeze(1)  # a dead row attends uniformly, as HF's mask makes it
    out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                     enable_gqa=True)
    if dead is not None and masked_rows == "zero":
        out = out.masked_fill(dead.unsqueeze(1), 0)
    return out


class MllamaTextCrossAttention(nn.Module):
    """Llama-3.2-Vision text-to-image cross-attention (no RoPE, GQA, q/k RMSNorm over head dim).

    ``forward(hidden_states (B, S, hidden), cross_attention_states (B, L, hidden) or kv=(k, v)
    (B, Hk, L, D) from :meth:`project_kv`, kv_ranges (B, S, R, 2) from
    :func:`vlmkern.ops.mllama_kv_ranges`) -> (B, S, hidden)``, after ``o_proj``. Rows that see no
    image follow ``masked_rows``: ``"uniform"`` (HF transformers, default) or ``"zero"`` (Meta).
    """

    def __init__(self, config=None, layer_idx: int | None = None, *, hidden_size: int = 4096,
                 num_heads: int = 32, num_kv_heads: int = 8, rms_norm_eps: float = 1e-5,
                 masked_rows: str = "uniform") -> None:
        super().__init__()
        self.hidden_size = _cfg(config, "hidden_size", hidden_size)
        self.num_heads = _cfg(config, "num_attention_heads", num_heads)
        self.num_key_value_heads = _cfg(config, "num_key_value_heads", num_kv_heads)
        self.head_dim = self.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.layer_idx = layer_idx
        self.masked_rows = masked_rows
        eps = _cfg(config, "rms_norm_eps", rms_norm_eps)
        hd, h, hk = self.head_dim, self.num_heads, self.num_key_value_heads
        self.q_proj = nn.Linear(self.hidden_size, h * hd, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, hk * hd, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, hk * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, self.hidden_size, bias=False)
        self.q_norm = MllamaTextRMSNorm(hd, eps=eps)
        self.k_norm = MllamaTextRMSNorm(hd, eps=eps)

    def project_kv(self, cross_attention_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image keys and values (B, Hk, L, D), computed once per image, reused while decoding."""
        b = cross_attention_states.shape[0]
        shape = (b, -1, self.num_key_value_heads, self.head_dim)
        k = self.k_proj(cross_attention_states).view(shape).transpose(1, 2)
        v = self.v_proj(cross_attention_states).view(shape).transpose(1, 2)
        return self.k_norm(k), v

    def attend(self, hidden_states: torch.Tensor,
               cross_attention_states: torch.Tensor | None = None, *,
               kv: tuple[torch.Tensor, torch.Tensor] | None = None,
               kv_ranges: torch.Tensor | None = None) -> torch.Tensor:
        """The attention output before ``o_proj``, (B, S, heads · head_dim)."""
        _need_keys("MllamaTextCrossAttention", cross_attention_states, kv)
        b, s, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        q = self.q_norm(q)
        k, v = self.project_kv(cross_attention_states) if kv is None else kv
        if q.is_cuda and (q.dtype not in CUDA_DTYPES or self.head_dim not in CUDA_HEAD_DIMS):
            out = _sdpa_with_ranges(q, k, v, self.scaling, kv_ranges, self.masked_rows)
        else:
            out = cross_attention(q, k, v, scale=self.scaling, kv_ranges=kv_ranges,
                                  masked_rows=self.masked_rows)
        return out.transpose(1, 2).reshape(b, s, -1)

    def forward(self, hidden_states: torch.Tensor,
                cross_attention_states: torch.Tensor | None = None, *,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_ranges: torch.Tensor | None = None) -> torch.Tensor:
        return self.o_proj(self.attend(hidden_states, cross_attention_states, kv=kv,
                                       kv_ranges=kv_ranges))


class MllamaTextMLP(nn.Module):
    """HF's ``MllamaTextMLP``: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MllamaCrossAttentionDecoderLayer(nn.Module):
    """``h = x + tanh(g_attn) · CrossAttn(RMSNorm(x))``;
    ``y = h + tanh(g_mlp) · (rowmask · MLP(RMSNorm(h)))`` (rowmask: the row sees an image).

    ``forward(hidden_states, cross_attention_states or kv=, kv_ranges=)``; ``kv_ranges`` from
    :func:`vlmkern.ops.mllama_kv_ranges` (or :meth:`kv_ranges` of the processor mask). With
    ``masked_rows="zero"`` (Meta's reference) both branches vanish on rows that see no image;
    ``"uniform"`` (HF, default) keeps HF's attention branch on them. Both gated residual adds
    run as :func:`vlmkern.ops.gated_linear` (fused into o_proj's / down_proj's GEMM on CUDA).
    """

    def __init__(self, config=None, layer_idx: int = 0, *, hidden_size: int = 4096,
                 num_heads: int = 32, num_kv_heads: int = 8, intermediate_size: int = 14336,
                 rms_norm_eps: float = 1e-5, masked_rows: str = "uniform") -> None:
        super().__init__()
        self.layer_idx = layer_idx
        hidden = _cfg(config, "hidden_size", hidden_size)
        eps = _cfg(config, "rms_norm_eps", rms_norm_eps)
        self.cross_attn = MllamaTextCrossAttention(
            config, layer_idx, hidden_size=hidden_size, num_heads=num_heads,
            num_kv_heads=num_kv_heads, rms_norm_eps=rms_norm_eps, masked_rows=masked_rows)
        self.input_layernorm = MllamaTextRMSNorm(hidden, eps=eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = MllamaTextMLP(hidden, _cfg(config, "intermediate_size", intermediate_size))
        self.post_attention_layernorm = MllamaTextRMSNorm(hidden, eps=eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    @staticmethod
    def kv_ranges(cross_attention_mask: torch.Tensor, num_vision_tokens: int = 1601):
        """The processor's (B, S, M, T) tile mask as visible key ranges (B, S, R, 2)."""
        return mllama_kv_ranges(cross_attention_mask, num_vision_tokens)

    def forward(self, hidden_states: torch.Tensor,
                cross_attention_states: torch.Tensor | None = None, *,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_ranges: torch.Tensor | None = None) -> torch.Tensor:
        _need_keys("MllamaCrossAttentionDecoderLayer", cross_attention_states, kv)
        # HF's full_text_row_masked_out_mask: the row sees an image.
        row = None if kv_ranges is None else \
            (kv_ranges[..., 1] > kv_ranges[..., 0]).any(-1, keepdim=True)
        return self._layer(hidden_states, cross_attention_states, kv, kv_ranges, row)

    def _layer(self, hidden_states: torch.Tensor, cross_attention_states: torch.Tensor | None,
               kv: tuple[torch.Tensor, torch.Tensor] | None, kv_ranges: torch.Tensor | None,
               row: torch.Tensor | None) -> torch.Tensor:
        """The layer, given which rows see an image: ``row`` (B, S, 1) (None: all of them)."""
        xattn, mlp = self.cross_attn, self.mlp
        normed = self.input_layernorm(hidden_states)
        gate = self.cross_attn_attn_gate
        if fusable(xattn, types=(MllamaTextCrossAttention,)):
            attn = xattn.attend(normed, cross_attention_states, kv=kv, kv_ranges=kv_ranges)
            # residual + tanh(gate) * o_proj(attn): gate and residual in the GEMM's epilogue.
            hidden_states = _gated_residual(xattn.o_proj, attn, gate, hidden_states)
        else:  # a wrapped / hooked attention module is called as a module
            attn = xattn(normed, cross_attention_states, kv=kv, kv_ranges=kv_ranges)
            hidden_states = hidden_states + gate.tanh() * attn
        normed = self.post_attention_layernorm(hidden_states)
        row = None if row is None else row.to(normed.dtype)
        projs = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if (fusable(mlp, types=(MllamaTextMLP,)) and fusable(*projs)
                and all(p.bias is None for p in projs)
                and not torch.is_autocast_enabled(normed.device.type)):
            # HF zeroes the MLP's output rows; this bias-free MLP maps a zero row to a zero row,
            # so zeroing its input rows instead is exact and leaves down_proj's epilogue free.
            if row is not None:
                normed = row * normed
            act = nn.functional.silu(mlp.gate_proj(normed)) * mlp.up_proj(normed)
            return gated_linear(act, mlp.down_proj.weight, self.cross_attn_mlp_gate,
                                hidden_states)
        out = mlp(normed)  # HF's math for a wrapped / hooked MLP
        if row is not None:
            out = row * out
        return hidden_states + self.cross_attn_mlp_gate.tanh() * out


class Blip2QFormerMultiHeadAttention(nn.Module):
    """BLIP-2 Q-Former attention (``query`` / ``key`` / ``value`` with bias), as a cross-attention
    (``encoder_hidden_states`` given) or self-attention. Learned queries given once,
    ``hidden_states`` (1, Lq, hidden), are projected once and broadcast over the B images."""

    def __init__(self, config=None, is_cross_attention: bool = False, *, hidden_size: int = 768,
                 num_heads: int = 12, encoder_hidden_size: int = 1408) -> None:
        super().__init__()
        hidden = _cfg(config, "hidden_size", hidden_size)
        self.num_attention_heads = _cfg(config, "num_attention_heads", num_heads)
        self.attention_head_size = hidden // self.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.scaling = self.attention_head_size**-0.5
        kv_in = _cfg(config, "encoder_hidden_size", encoder_hidden_size) if is_cross_attention \
            else hidden
        self.query = nn.Linear(hidden, self.all_head_size)
        self.key = nn.Linear(kv_in, self.all_head_size)
        self.value = nn.Linear(kv_in, self.all_head_size)

    def forward(self, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        states = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, hd = max(hidden_states.shape[0], states.shape[0]), self.attention_head_size
        q = self.query(hidden_states).unflatten(-1, (-1, hd))  # (1 or B, Lq, H, D)
        k = self.key(states).unflatten(-1, (-1, hd))  # (1 or B, Lk, H, D)
        v = self.value(states).unflatten(-1, (-1, hd))
        # a batch of one broadcast over the other side's B (as HF's matmuls): stride 0, no copy
        q, k, v = (t.expand(b, -1, -1, -1) if t.shape[0] != b else t for t in (q, k, v))
        out = cross_attention(q, k, v, scale=self.scaling, layout="bshd")
        return out.flatten(-2)


class Blip2QFormerSelfOutput(nn.Module):
    """``LayerNorm(dense(x) + input)`` (HF's ``Blip2QFormerSelfOutput``, no dropout)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + input_tensor)


class Blip2QFormerAttention(nn.Module):
    """HF's ``Blip2QFormerAttention``: multi-head attention + output projection, residual, LN."""

    def __init__(self, config=None, is_cross_attention: bool = False, *, hidden_size: int = 768,
                 num_heads: int = 12, encoder_hidden_size: int = 1408,
                 layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.attention = Blip2QFormerMultiHeadAttention(
            config, is_cross_attention, hidden_size=hidden_size, num_heads=num_heads,
            encoder_hidden_size=encoder_hidden_size)
        self.output = Blip2QFormerSelfOutput(_cfg(config, "hidden_size", hidden_size),
                                             _cfg(config, "layer_norm_eps", layer_norm_eps))

    def forward(self, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        out = self.attention(hidden_states, encoder_hidden_states)
        if hidden_states.shape[0] != out.shape[0]:
            hidden_states = hidden_states.expand(out.shape[0], -1, -1)
        return self.output(out, hidden_states)
