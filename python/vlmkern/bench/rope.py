"""RoPE bench: vlmkern's M-RoPE (Qwen2-VL sectioned, Qwen3-VL interleaved), Qwen ViT 2D RoPE and
their backward vs HF eager (cos/sin from HF's rotary module, then ``apply_rotary_pos_emb``),
torch.compile of it and Liger-Kernel's M-RoPE, on Qwen2-VL-7B / Qwen3-VL-8B shapes.

Every provider is called as ``fn(q, k, positions, cos, sin, spec=...)`` and returns the rotated
q (k goes through the same code in every provider; the tests check it). q/k are in HF's layout:
``(B, H, S, D)`` views of a ``(B, S, H, D)`` projection for text, and ``(N, H, D)`` slices of a
fused qkv for vision. ``cos``/``sin`` are HF's precomputed tables, used by "HF apply" only.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from vlmkern.bench.harness import Case, Config

NAME = "rope"
BASELINE = "HF eager"
EXACT = False  # fp32 math vs HF's low-precision math: tolerance gate


@dataclass(frozen=True)
class Spec:
    """What one case rotates: text M-RoPE (sectioned or interleaved) or vision 2D RoPE; backward
    cases rotate incoming gradients by -angle (``rope_backward``)."""

    kind: str  # "mrope" or "vision"
    section: tuple[int, ...] = (16, 24, 24)
    theta: float = 1e6
    interleaved: bool = False
    backward: bool = False


# --- HF: transformers' own modules when importable, else the same math restated ---------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """HF ``apply_rotary_pos_emb`` (text): math in the dtype of cos/sin (the model dtype)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _apply_rotary_pos_emb_vision(q, k, cos, sin):
    """HF ``apply_rotary_pos_emb_vision``: fp32 upcast, rotate, cast back."""
    dt = q.dtype
    q, k = q.float(), k.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return ((q * cos + _rotate_half(q) * sin).to(dt), (k * cos + _rotate_half(k) * sin).to(dt))


class _TextRotary(torch.nn.Module):
    """``Qwen2VLRotaryEmbedding`` / ``Qwen3VLTextRotaryEmbedding`` forward, restated."""

    def __init__(self, spec: Spec, dim: int = 128) -> None:
        super().__init__()
        self.spec = spec
        arange = torch.arange(0, dim, 2, dtype=torch.int64).float()
        self.register_buffer("inv_freq", 1.0 / (spec.theta ** (arange / dim)), persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids):
        pos = position_ids.expand(3, -1, -1)
        freqs = pos[..., None].float() * self.inv_freq.to(x.device)
        out = []
        for f in (freqs.cos(), freqs.sin()):
            if self.spec.interleaved:
                thw = f[0]
                for dim, offset in ((1, 1), (2, 2)):
                    idx = slice(offset, self.spec.section[dim] * 3, 3)
                    thw[..., idx] = f[dim, ..., idx]
            else:
                parts = f.split(list(self.spec.section), dim=-1)
                thw = torch.cat([m[i % 3] for i, m in enumerate(parts)], dim=-1)
            out.append(torch.cat((thw, thw), dim=-1).to(x.dtype))
        return tuple(out)


class _VisionRotary(torch.nn.Module):
    """``Qwen2VLVisionRotaryEmbedding`` forward (positions (N, 2) -> fp32 cos/sin (N, D))."""

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        half = dim // 2
        arange = torch.arange(0, half, 2, dtype=torch.float)
        self.register_buffer("inv_freq", 1.0 / (theta ** (arange / half)), persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        out = []
        for f in (freqs.cos(), freqs.sin()):
            hw = torch.cat([f[:, 0], f[:, 1]], dim=-1)
            out.append(torch.cat([hw, hw], dim=-1))
        return tuple(out)


_HF_CACHE: dict = {}


def hf_functions() -> SimpleNamespace:
    """HF's rotary modules and apply functions (transformers >= 5.23), or the restated copies
    above when transformers is missing or older (``source`` says which)."""
    if "ns" in _HF_CACHE:
        return _HF_CACHE["ns"]
    ns = SimpleNamespace(source="restated", apply_text=_apply_rotary_pos_emb,
                         apply_vision=_apply_rotary_pos_emb_vision,
                         text_rotary=lambda spec, dim: _TextRotary(spec, dim),
                         vision_rotary=lambda dim: _VisionRotary(dim))
    try:
        from transformers.models.qwen2_vl import configuration_qwen2_vl as c2
        from transformers.models.qwen2_vl import modeling_qwen2_vl as m2
        from transformers.models.qwen3_vl import configuration_qwen3_vl as c3
        from transformers.models.qwen3_vl import modeling_qwen3_vl as m3

        def text_rotary(spec: Spec, dim: int):
            conf, mod, emb = ((c3.Qwen3VLTextConfig, m3, "Qwen3VLTextRotaryEmbedding")
                              if spec.interleaved else
                              (c2.Qwen2VLTextConfig, m2, "Qwen2VLRotaryEmbedding"))
            params = {"rope_type": "default", "mrope_section": list(spec.section),
                      "rope_theta": spec.theta}
            if spec.interleaved:
                params["mrope_interleaved"] = True
            cfg = conf(hidden_size=dim, num_attention_heads=1, num_key_value_heads=1,
                       head_dim=dim, num_hidden_layers=1, rope_parameters=params)
            return getattr(mod, emb)(cfg)

        def vision_rotary(dim: int):
            return m2.Qwen2VLVisionRotaryEmbedding(
                c2.Qwen2VLVisionConfig(embed_dim=dim, num_heads=1, depth=1))

        text_rotary(Spec("mrope"), 128)  # fails here on an older transformers
        ns = SimpleNamespace(source="transformers", apply_text=m2.apply_rotary_pos_emb,
                             apply_vision=m2.apply_rotary_pos_emb_vision,
                             text_rotary=text_rotary, vision_rotary=vision_rotary)
    except Exception:  # noqa: BLE001 - no (or an older) transformers: use the restated copies
        pass
    _HF_CACHE["ns"] = ns
    return ns


def _rotary(spec: Spec, dim: int, device: torch.device):
    key = (spec.kind, spec.section, spec.theta, spec.interleaved, dim, str(device))
    if key not in _HF_CACHE:
        hf = hf_functions()
        mod = hf.vision_rotary(dim) if spec.kind == "vision" else hf.text_rotary(spec, dim)
        _HF_CACHE[key] = mod.to(device)
    return _HF_CACHE[key]


def _rotate_half_t(x: torch.Tensor) -> torch.Tensor:
    """The transpose of rotate_half: what its autograd backward computes."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


def _hf_pair(q, k, cos, sin, spec: Spec):
    """HF's rotation of q and k with the given tables. For backward cases, the math autograd
    runs for it, ``g·cos + rotate_halfᵀ(g·sin)`` (without autograd's zero-filled slice
    gradients, so a lower bound on HF's backward time)."""
    hf = hf_functions()
    if not spec.backward:
        return (hf.apply_vision if spec.kind == "vision" else hf.apply_text)(q, k, cos, sin)
    if spec.kind == "vision":  # fp32 upcast, as the forward
        cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        return tuple((g.float() * cos + _rotate_half_t(g.float() * sin)).to(g.dtype)
                     for g in (q, k))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return tuple(g * cos + _rotate_half_t(g * sin) for g in (q, k))


def hf_eager(q, k, positions, cos, sin, spec: Spec) -> torch.Tensor:
    """HF per call: cos/sin from the rotary module, then the rotation of q and k."""
    cos, sin = _rotary(spec, q.shape[-1], q.device)(q, positions)
    return _hf_pair(q, k, cos, sin, spec)[0]


def hf_apply(q, k, positions, cos, sin, spec: Spec) -> torch.Tensor:
    """HF with cos/sin precomputed (built once per forward and shared by every layer)."""
    return _hf_pair(q, k, cos, sin, spec)[0]


# --- vlmkern and Liger ----------------------------------------------------------------------------


def _table(spec: Spec, dim: int):
    from vlmkern.ops.rope import mrope_table, vision_rope_table

    if spec.kind == "vision":
        return vision_rope_table(dim, 10000.0)
    return mrope_table(spec.section, spec.theta, spec.interleaved, dim)


def vlmkern_rope(q, k, positions, cos, sin, spec: Spec) -> torch.Tensor:
    """vlmkern.ops.mrope / vision_rope; backward cases call torch.ops.vlmkern.rope_backward."""
    import vlmkern.ops

    if spec.backward:
        inv_freq, axis = _table(spec, q.shape[-1])
        if spec.kind == "vision":
            q4, k4, pos = q.unsqueeze(0), k.unsqueeze(0), positions.t().unsqueeze(1)
        else:
            q4, k4, pos = q.transpose(1, 2), k.transpose(1, 2), positions
        gq, _ = torch.ops.vlmkern.rope_backward(q4, k4, pos, list(inv_freq), list(axis), 1.0)
        return gq.squeeze(0) if spec.kind == "vision" else gq.transpose(1, 2)
    if spec.kind == "vision":
        return vlmkern.ops.vision_rope(q, k, positions)[0]
    return vlmkern.ops.mrope(q, k, positions, spec.section, theta=spec.theta,
                             interleaved=spec.interleaved)[0]


def liger_provider() -> Callable | None:
    """Liger-Kernel's Triton M-RoPE (sectioned text only, CUDA), or None when not importable.
    Liger takes per-axis cos/sin (3, B, S, D), built here per call as HF <= 4.x did. It rotates
    HF-layout q/k in place (same bytes moved); as the last provider it is checked after the
    others, and later timing passes just see rotated inputs."""
    try:
        from liger_kernel.transformers.qwen2vl_mrope import liger_multimodal_rotary_pos_emb
    except Exception:  # noqa: BLE001 - not installed, or no triton
        return None

    def liger(q, k, positions, cos, sin, spec: Spec) -> torch.Tensor:
        if spec.kind != "mrope" or spec.interleaved or spec.backward:
            raise NotImplementedError("Liger's M-RoPE covers the sectioned text forward only")
        inv = _rotary(spec, q.shape[-1], q.device).inv_freq
        freqs = positions[..., None].float() * inv.to(q.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        c3, s3 = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return liger_multimodal_rotary_pos_emb(q, k, c3, s3, list(spec.section))[0]

    return liger


class _Compiled:
    """torch.compile of HF eager, recompiled per case (dynamo reset on each new shape) so every
    shape gets its own static-shape kernel."""

    def __init__(self) -> None:
        self._key = None
        self._fn: Callable | None = None

    def __call__(self, q, k, positions, cos, sin, spec: Spec) -> torch.Tensor:
        key = (tuple(q.shape), q.stride(), tuple(k.shape), q.dtype, q.device, spec)
        if key != self._key:
            torch._dynamo.reset()
            self._fn = torch.compile(hf_eager, dynamic=False)
            self._key = key
        return self._fn(q, k, positions, cos, sin, spec=spec)


# --- cases ----------------------------------------------------------------------------------------


def _text_positions(B: int, S: int, device: str) -> torch.Tensor:
    """(3, B, S) ids like get_rope_index: a text prompt, an image block on a ~square merged grid
    (a quarter of the tokens), then text resuming after the block."""
    pos = torch.arange(S).repeat(3, B, 1)
    n_img = S // 4
    gw = max(1, int(math.sqrt(n_img)))
    gh = n_img // gw
    p = S // 8
    img = torch.stack([torch.zeros(gh * gw, dtype=torch.int64),
                       torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh)])
    pos[:, :, p : p + gh * gw] = p + img[:, None, :]
    pos[:, :, p + gh * gw :] = p + max(gh, gw) + torch.arange(S - p - gh * gw)
    return pos.to(device)


def _randn(shape, device: str, dtype: torch.dtype) -> torch.Tensor:
    """randn / 4: HF's own bf16 rounding (about an ulp of the largest |q|) then stays inside the
    harness's absolute 2e-2 gate on millions of elements; the scale does not change any timing."""
    return (torch.randn(shape, device=device) * 0.25).to(dtype)


def _text_case(label: str, B: int, S: int, heads: tuple[int, int], spec: Spec,
               cfg: Config) -> Case:
    hq, hk, d = *heads, 128
    dev, dt = cfg.device, cfg.dtype
    elt = torch.empty((), dtype=dt).element_size()
    pos = _text_positions(B, S, dev)
    cos, sin = _rotary(spec, d, torch.device(dev))(torch.empty(0, dtype=dt, device=dev), pos)

    def make() -> tuple:
        q = _randn((B, S, hq, d), dev, dt).transpose(1, 2)
        k = _randn((B, S, hk, d), dev, dt).transpose(1, 2)
        return q, k, pos, cos, sin

    shape = f"{label} B{B} S{S} {hq}/{hk}" + (" interleaved" if spec.interleaved else "")
    nbytes = 2 * B * S * (hq + hk) * d * elt + pos.numel() * pos.element_size()
    return Case(shape + (" bwd" if spec.backward else ""), make, nbytes, {"spec": spec})


def _vision_case(label: str, N: int, d: int, spec: Spec, cfg: Config, heads: int = 16) -> Case:
    dev, dt = cfg.device, cfg.dtype
    elt = torch.empty((), dtype=dt).element_size()
    side = int(math.sqrt(N))
    pos = torch.stack([torch.arange(N) // side, torch.arange(N) % side], 1).to(dev)
    cos, sin = _rotary(spec, d, torch.device(dev))(torch.empty(0, device=dev), pos)

    def make() -> tuple:
        qkv = _randn((N, 3, heads, d), dev, dt)  # HF: qkv(x).reshape(N, 3, H, -1)
        return qkv[:, 0], qkv[:, 1], pos, cos, sin

    nbytes = 2 * 2 * N * heads * d * elt + pos.numel() * pos.element_size()
    shape = f"{label} N{N} {heads}h hd{d}" + (" bwd" if spec.backward else "")
    return Case(shape, make, nbytes, {"spec": spec})


def cases(cfg: Config) -> list[Case]:
    """GPU: Qwen2-VL-7B text (28/4, [16,24,24]) B {1, 8} x S {1024, 8192}, Qwen3-VL-8B (32/8,
    interleaved [24,20,20]) S 4096, Qwen2-VL / Qwen3-VL ViT (hd 80 / 72) N {1024, 16384}, and
    backward. CPU: the same models at S <= 4096 (S 4096 Qwen2-VL is the CPU anchor)."""
    q2, q3 = Spec("mrope"), Spec("mrope", (24, 20, 20), 5e6, True)
    vis = Spec("vision", (), 10000.0)
    q2_bwd, vis_bwd = Spec("mrope", backward=True), Spec("vision", (), 10000.0, backward=True)
    if cfg.device == "cuda":
        if cfg.quick:
            return [_text_case("qwen2vl-7b", 1, 8192, (28, 4), q2, cfg),
                    _text_case("qwen3vl-8b", 1, 4096, (32, 8), q3, cfg),
                    _vision_case("vit-qwen2vl", 16384, 80, vis, cfg),
                    _text_case("qwen2vl-7b", 1, 8192, (28, 4), q2_bwd, cfg)]
        out = [_text_case("qwen2vl-7b", b, s, (28, 4), q2, cfg) for b in (1, 8)
               for s in (1024, 8192)]
        out.append(_text_case("qwen3vl-8b", 1, 4096, (32, 8), q3, cfg))
        out += [_vision_case(f"vit-{m}", n, d, vis, cfg) for m, d in (("qwen2vl", 80),
                ("qwen3vl", 72)) for n in (1024, 16384)]
        return out + [_text_case("qwen2vl-7b", 1, 8192, (28, 4), q2_bwd, cfg),
                      _vision_case("vit-qwen2vl", 16384, 80, vis_bwd, cfg)]
    if cfg.quick:
        return [_text_case("qwen2vl-7b", 1, 4096, (28, 4), q2, cfg),
                _vision_case("vit-qwen2vl", 1024, 80, vis, cfg),
                _text_case("qwen2vl-7b", 1, 1024, (28, 4), q2_bwd, cfg)]
    return [_text_case("qwen2vl-7b", 1, 1024, (28, 4), q2, cfg),
            _text_case("qwen2vl-7b", 1, 4096, (28, 4), q2, cfg),
            _text_case("qwen3vl-8b", 1, 2048, (32, 8), q3, cfg),
            _vision_case("vit-qwen2vl", 1024, 80, vis, cfg),
            _vision_case("vit-qwen3vl", 4096, 72, vis, cfg),
            _text_case("qwen2vl-7b", 1, 4096, (28, 4), q2_bwd, cfg),
            _vision_case("vit-qwen2vl", 1024, 80, vis_bwd, cfg)]


def providers(cfg: Config) -> dict[str, Callable]:
    print(f"  HF providers use {hf_functions().source} code", file=sys.stderr, flush=True)
    out: dict[str, Callable] = {"vlmkern": vlmkern_rope, "HF eager": hf_eager, "HF apply": hf_apply}
    if cfg.compile:
        out["torch.compile"] = _Compiled()
    liger = liger_provider() if cfg.device == "cuda" else None
    if liger is not None:
        out["liger"] = liger
    return out


def reference() -> Callable:
    """vlmkern.reference in float64 (HF's fp32 angles), q's rotation; -angle for backward."""
    import vlmkern.reference as ref

    def rotate_q(q, k, positions, cos, sin, spec: Spec) -> torch.Tensor:
        pos = -positions if spec.backward else positions  # float(-p) = -float(p): exact
        if spec.kind == "vision":
            return ref.vision_rope(q, k, pos)[0]
        return ref.mrope(q, k, pos, spec.section, spec.theta, spec.interleaved)[0]

    return rotate_q
