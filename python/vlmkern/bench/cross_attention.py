"""Cross-attention bench: vlmkern.ops.cross_attention vs torch SDPA (the default choice and each
backend, with HF's dense Mllama mask / a prefix-LM mask / a per-segment loop for packed input),
HF's eager attention and compiled FlexAttention with block masks (with torch.compile only), on
Llama-3.2-11B-Vision (q 32 heads, kv 8 heads × 1601·tiles image tokens, hd 128; prefill and
decode steps; an "unmasked" prefill of the same shapes, every token seeing every key, to compare
the masked kernel's TFLOP/s with the plain one's), BLIP-2 Q-Former (32 learned queries × 257
keys × many images, 12 × 64), Qwen2-VL ViT packed segments (16 × 80) and PaliGemma-3B prefix-LM
(8 / 1 heads × 256).

Every provider is called as ``fn(q, k, v, aux, spec=...)`` with q/k/v in HF's ``(B, H, S, D)``
(packed: ``(total, H, D)``) and returns the attention output in q's layout. TFLOP/s count only
visible (query, key) pairs: 4·D·Hq·pairs. On CUDA the vlmkern provider runs the flash-attention 2
forward kernel (bf16 / fp16; with ``--dtype fp32`` it reports that the CUDA kernel takes bf16 /
fp16 only); ``vlmkern.m128`` (CUDA only) forces its experimental 128-row / 8-warp CTAs
(``VLMKERN_XATTN_BLOCK_M=128``) on the cases with more than 64 query rows per sequence at head
dims 64 / 96 / 128 (the Mllama prefill; not Qwen2-VL's hd 80 nor PaliGemma's hd 256);
``vlmkern.4x32`` (CUDA only) forces 128-row CTAs of 4 warps x 32 rows
(``VLMKERN_XATTN_WARP_ROWS=32``, flash-attention 2's long-sequence shape) on the cases with more
than 64 query rows at every CUDA head dim; ``vlmkern.img4`` (CUDA only) runs 4 images per CTA
(``VLMKERN_XATTN_IMAGES_PER_CTA=4``) on the batched cases whose query rows fit one CTA (the
Q-Former).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from vlmkern.bench.harness import Case, Config, env_var

NAME = "cross_attention"
BASELINE = "SDPA"
EXACT = False  # fp32 accumulation vs each backend's own: tolerance gate


@dataclass(frozen=True)
class Spec:
    kind: str  # "mllama", "plain" (Mllama's shapes, no mask), "qformer", "packed", "prefix_lm"


# --- inputs ---------------------------------------------------------------------------------------


def _randn(shape, cfg: Config) -> torch.Tensor:
    return torch.randn(shape, device=cfg.device).to(cfg.dtype)


def _mllama_case(B: int, S: int, tiles: int, cfg: Config, images: int = 2,
                 masked: bool = True) -> Case:  # fmt: skip
    """`images` images of `tiles` tiles each (keys images·tiles·1601): the first 4 tokens see
    nothing (HF: uniform over all keys), tokens [4, S/2) see image 1, the rest the last image
    only. masked=False: the same shapes with every token seeing every key (no ranges, no mask),
    the plain attention the masked case's TFLOP/s is compared with."""
    from vlmkern.ops import mllama_kv_ranges
    from vlmkern.reference.cross_attention import mllama_dense_mask

    hq, hk, d, nvt, M = 32, 8, 128, 1601, images
    L = M * tiles * nvt
    mask = torch.zeros(B, S, M, tiles, dtype=torch.int64)
    mask[:, 4 : S // 2, 0] = 1
    mask[:, S // 2 :, M - 1] = 1
    aux = {"ranges": mllama_kv_ranges(mask, nvt).to(cfg.device),
           "dense": mllama_dense_mask(mask, nvt, cfg.dtype)[0].to(cfg.device)} if masked else {}

    def make() -> tuple:
        q = _randn((B, S, hq, d), cfg).transpose(1, 2)
        kv = _randn((B, L, 2, hk, d), cfg)  # fused kv projection
        return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), aux

    pairs = B * (4 * L + (S - 4) * L // M) if masked else B * S * L
    elt = torch.empty((), dtype=cfg.dtype).element_size()
    nbytes = elt * (2 * B * S * hq * d + 2 * B * L * hk * d)
    return Case(f"mllama-11b B{B} S{S} L{L}" + ("" if masked else " unmasked"), make, nbytes,
                {"spec": Spec("mllama" if masked else "plain")}, flops=4 * d * hq * pairs)


def _mllama_decode_case(B: int, tiles: int, cfg: Config) -> Case:
    """A decode step: one new text token per sequence attending to its image's cached K/V (one
    image of `tiles` tiles, 1601 keys each): bandwidth-bound, B·Hq query rows in all."""
    from vlmkern.ops import mllama_kv_ranges
    from vlmkern.reference.cross_attention import mllama_dense_mask

    hq, hk, d, nvt = 32, 8, 128, 1601
    L = tiles * nvt
    mask = torch.ones(B, 1, 1, tiles, dtype=torch.int64)
    aux = {"ranges": mllama_kv_ranges(mask, nvt).to(cfg.device),
           "dense": mllama_dense_mask(mask, nvt, cfg.dtype)[0].to(cfg.device)}

    def make() -> tuple:
        q = _randn((B, 1, hq, d), cfg).transpose(1, 2)
        kv = _randn((B, L, 2, hk, d), cfg)
        return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), aux

    elt = torch.empty((), dtype=cfg.dtype).element_size()
    nbytes = elt * (2 * B * hq * d + 2 * B * L * hk * d)
    return Case(f"mllama-11b decode B{B} L{L}", make, nbytes, {"spec": Spec("mllama")},
                flops=4 * d * hq * B * L)


def _qformer_case(B: int, cfg: Config) -> Case:
    """BLIP-2: 32 learned queries (one copy, expanded over the batch) × 257 image tokens."""
    h, d, lq, lk = 12, 64, 32, 257
    queries = _randn((1, h, lq, d), cfg)

    def make() -> tuple:
        kv = _randn((B, lk, 2, h, d), cfg)
        q = queries.expand(B, -1, -1, -1)
        return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), {}

    elt = torch.empty((), dtype=cfg.dtype).element_size()
    nbytes = elt * (lq * h * d + 2 * B * lk * h * d + B * lq * h * d)
    return Case(f"qformer B{B} 32x257", make, nbytes, {"spec": Spec("qformer")},
                flops=4 * d * h * B * lq * lk)


def _packed_case(lens: list[int], cfg: Config) -> Case:
    """Qwen2-VL ViT full attention within each image: packed (total, 16, 80) with cu_seqlens."""
    h, d, total = 16, 80, sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                      device=cfg.device)
    aux = {"cu": cu, "lens": lens}

    def make() -> tuple:
        qkv = _randn((total, 3, h, d), cfg)  # HF: qkv(x).reshape(N, 3, H, -1)
        return qkv[:, 0], qkv[:, 1], qkv[:, 2], aux

    elt = torch.empty((), dtype=cfg.dtype).element_size()
    return Case(f"qwen2vl-vit {len(lens)}x{lens[0]} hd80", make, 4 * total * h * d * elt,
                {"spec": Spec("packed")}, flops=4 * d * h * sum(n * n for n in lens))


def _prefix_case(B: int, S: int, prefix: int, cfg: Config) -> Case:
    """PaliGemma-3B (Gemma-2B): 8 q heads, 1 kv head, hd 256; [256 image | prompt] is the prefix."""
    hq, hk, d = 8, 1, 256
    plen = torch.full((B,), prefix, device=cfg.device)
    i, j = torch.arange(S)[:, None], torch.arange(S)
    dense = ((j < prefix) | (j <= i)).to(cfg.device).expand(B, 1, S, S)
    aux = {"prefix": plen, "dense": dense}

    def make() -> tuple:
        q = _randn((B, S, hq, d), cfg).transpose(1, 2)
        kv = _randn((B, S, 2, hk, d), cfg)
        return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), aux

    pairs = B * sum(max(prefix, r + 1) for r in range(S))
    elt = torch.empty((), dtype=cfg.dtype).element_size()
    return Case(f"paligemma B{B} S{S} prefix{prefix}", make, elt * 4 * B * S * hq * d,
                {"spec": Spec("prefix_lm")}, flops=4 * d * hq * pairs)


def cases(cfg: Config) -> list[Case]:
    """GPU: Mllama S 256–4096 × 1601–6404 keys (masked; S 1024 × 6404 also unmasked) and decode
    steps (B 1–32 × 6404 keys), Q-Former
    1–256 images, Qwen2-VL ViT 8×1024, PaliGemma S 1024. CPU: small versions that run in a few
    minutes."""
    if cfg.device == "cuda":
        if cfg.quick:
            return [_mllama_case(1, 1024, 2, cfg), _qformer_case(64, cfg),
                    _packed_case([1024] * 8, cfg), _prefix_case(1, 1024, 288, cfg)]
        return ([_mllama_case(1, 256, 1, cfg, images=1)]
                + [_mllama_case(1, s, t, cfg) for s, t in ((256, 1), (1024, 2), (4096, 2))]
                + [_mllama_case(1, 1024, 2, cfg, masked=False)]
                + [_mllama_decode_case(b, 4, cfg) for b in (1, 8, 32)]
                + [_qformer_case(b, cfg) for b in (1, 16, 256)]
                + [_packed_case([1024] * 8, cfg), _prefix_case(4, 1024, 288, cfg)])
    if cfg.quick:
        return [_mllama_case(1, 128, 1, cfg), _qformer_case(16, cfg)]
    return [_mllama_case(1, 256, 1, cfg), _mllama_case(1, 64, 2, cfg),
            _mllama_case(1, 64, 2, cfg, masked=False),
            _mllama_decode_case(2, 4, cfg), _qformer_case(16, cfg),
            _qformer_case(64, cfg), _packed_case([256] * 4, cfg), _prefix_case(1, 512, 288, cfg)]


# --- providers ------------------------------------------------------------------------------------


def vlmkern_xattn(q, k, v, aux, spec: Spec) -> torch.Tensor:
    from vlmkern.ops import cross_attention

    if spec.kind == "mllama":
        return cross_attention(q, k, v, kv_ranges=aux["ranges"], masked_rows="uniform")
    if spec.kind == "packed":
        return cross_attention(q, k, v, cu_seqlens_q=aux["cu"], cu_seqlens_k=aux["cu"])
    if spec.kind == "prefix_lm":
        return cross_attention(q, k, v, mode="prefix_lm", prefix_len=aux["prefix"])
    return cross_attention(q, k, v)


def vlmkern_m128(q, k, v, aux, spec: Spec) -> torch.Tensor:
    """vlmkern with ``VLMKERN_XATTN_BLOCK_M=128`` (128-row / 8-warp forward CTAs). Raises
    ValueError (the harness skips the provider) where the kernel has no 128-row CTA (head dims
    other than 64 / 96 / 128) or a sequence has <= 64 query rows (decode, Q-Former: the 64-row
    CTA already holds them)."""
    d, rows = q.shape[-1], q.shape[0] if spec.kind == "packed" else q.shape[-2]
    if d not in (64, 96, 128):
        raise ValueError(f"no 128-row CTA at head dim {d}")
    if rows <= 64:
        raise ValueError(f"{rows} query rows fit one 64-row CTA")
    with env_var("VLMKERN_XATTN_BLOCK_M", "128"):
        return vlmkern_xattn(q, k, v, aux, spec)


def _sdpa(q, k, v, aux, spec: Spec) -> torch.Tensor:
    gqa = q.shape[-3] != k.shape[-3]
    if spec.kind == "packed":  # HF's Qwen2-VL SDPA path: one 4-D call per image
        from vlmkern.nn.vision_attention import _sdpa_segment

        splits = [torch.split(t, aux["lens"], 0) for t in (q, k, v)]
        return torch.cat([_sdpa_segment(*s) for s in zip(*splits, strict=True)], 0)
    mask = aux.get("dense")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _sdpa_backend(backend) -> Callable:
    def fn(q, k, v, aux, spec: Spec) -> torch.Tensor:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            return _sdpa(q, k, v, aux, spec)

    return fn


def _hf_eager_fn() -> Callable | None:
    """transformers' own Mllama eager_attention_forward (None when transformers is missing)."""
    try:
        from transformers.models.mllama.modeling_mllama import eager_attention_forward
    except Exception:  # noqa: BLE001 - no (or an older) transformers: use the restated math
        return None
    return eager_attention_forward


def hf_eager(q, k, v, aux, spec: Spec) -> torch.Tensor:
    """HF's eager attention (transformers' function when importable, else restated): repeat_kv,
    matmul, additive mask, fp32 softmax, matmul. Output as (B, H, S, D) like the others."""
    if spec.kind == "packed":
        raise NotImplementedError("HF eager Qwen2-VL ViT: see the SDPA per-image loop")
    g = q.shape[1] // k.shape[1]
    mask = aux.get("dense")
    if mask is not None and mask.dtype == torch.bool:  # prefix-LM: HF's additive form
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~mask, torch.finfo(q.dtype).min)
    fn = _hf_eager_fn()
    if fn is not None:
        module = SimpleNamespace(num_key_value_groups=g, training=False)
        return fn(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)[0].transpose(1, 2)
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s + mask
    p = torch.softmax(s, -1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


class _Flex:
    """FlexAttention, compiled (its eager path is a reference loop, not a contender), with each
    case's visibility as a block mask built once per case outside the timed call: Mllama ranges
    (dead rows see every key, HF's "uniform"), document masking for packed segments, prefix-LM;
    the Q-Former runs unmasked. Recompiled per case (static shapes)."""

    def __init__(self) -> None:
        self._key = None
        self._fn: Callable | None = None
        self._mask = None

    def _block_mask(self, q, k, aux, spec: Spec):
        from torch.nn.attention.flex_attention import create_block_mask

        if spec.kind == "mllama":
            ranges = aux["ranges"].long()  # (B, S, R, 2)
            dead = (ranges[..., 0] >= ranges[..., 1]).all(-1)  # (B, S)

            def mask_mod(b, h, qi, kv):  # unrolled over R: Inductor lowers it pointwise
                seen = dead[b, qi]
                for r in range(ranges.shape[2]):
                    seen = seen | ((ranges[b, qi, r, 0] <= kv) & (kv < ranges[b, qi, r, 1]))
                return seen

            B, S, L = q.shape[0], q.shape[2], k.shape[2]
        elif spec.kind == "packed":
            lens = torch.tensor(aux["lens"], device=q.device)
            doc = torch.repeat_interleave(torch.arange(len(lens), device=q.device), lens)

            def mask_mod(b, h, qi, kv):
                return doc[qi] == doc[kv]

            B, S, L = 1, q.shape[0], k.shape[0]
        elif spec.kind == "prefix_lm":
            prefix = aux["prefix"]

            def mask_mod(b, h, qi, kv):
                return (kv <= qi) | (kv < prefix[b])

            B, S, L = q.shape[0], q.shape[2], k.shape[2]
        else:
            return None
        return create_block_mask(mask_mod, B, None, S, L, device=q.device)

    def __call__(self, q, k, v, aux, spec: Spec) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        key = (id(aux), spec, tuple(q.shape), tuple(k.shape), q.dtype)
        if key != self._key:
            torch._dynamo.reset()
            self._fn = torch.compile(flex_attention, dynamic=False)
            self._mask = self._block_mask(q, k, aux, spec)
            self._key = key
        packed = spec.kind == "packed"
        if packed:  # (total, H, D) -> (1, H, total, D)
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = self._fn(q, k, v, block_mask=self._mask, enable_gqa=q.shape[1] != k.shape[1])
        return out[0].transpose(0, 1) if packed else out


def vlmkern_4x32(q, k, v, aux, spec: Spec) -> torch.Tensor:
    """vlmkern with ``VLMKERN_XATTN_WARP_ROWS=32`` (128-row CTAs of 4 warps x 32 rows). Raises
    ValueError (the harness skips the provider) where a sequence has <= 64 query rows (decode,
    Q-Former: the 64-row CTA already holds them)."""
    rows = q.shape[0] if spec.kind == "packed" else q.shape[-2]
    if rows <= 64:
        raise ValueError(f"{rows} query rows fit one 64-row CTA")
    with env_var("VLMKERN_XATTN_WARP_ROWS", "32"):
        return vlmkern_xattn(q, k, v, aux, spec)


def vlmkern_img4(q, k, v, aux, spec: Spec) -> torch.Tensor:
    """vlmkern with ``VLMKERN_XATTN_IMAGES_PER_CTA=4`` (four (image, head) pairs per forward CTA).
    Raises ValueError (the harness skips the provider) for packed input, one image, or more than
    64 query rows (several windows per image): the kernel would run one image per CTA."""
    if spec.kind == "packed" or q.shape[0] == 1 or q.shape[-2] > 64:
        raise ValueError("not a batch of images whose query rows fit one CTA")
    with env_var("VLMKERN_XATTN_IMAGES_PER_CTA", "4"):
        return vlmkern_xattn(q, k, v, aux, spec)


def providers(cfg: Config) -> dict[str, Callable]:
    from torch.nn.attention import SDPBackend

    out: dict[str, Callable] = {"vlmkern": vlmkern_xattn, "SDPA": _sdpa}
    if cfg.device == "cuda":
        out["vlmkern.m128"] = vlmkern_m128
        out["vlmkern.4x32"] = vlmkern_4x32
        out["vlmkern.img4"] = vlmkern_img4
    names = {"MATH": "SDPA math", "FLASH_ATTENTION": "SDPA flash", "EFFICIENT_ATTENTION":
             "SDPA mem-eff", "CUDNN_ATTENTION": "SDPA cudnn"}
    for attr, name in names.items():
        if cfg.device == "cpu" and attr in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            continue
        if hasattr(SDPBackend, attr):
            out[name] = _sdpa_backend(getattr(SDPBackend, attr))
    out["HF eager"] = hf_eager
    if cfg.compile:
        out["FlexAttention"] = _Flex()
    return out


def reference() -> Callable:
    """vlmkern.reference.cross_attention in float64, cast to q's dtype."""
    import vlmkern.reference as ref

    def attend(q, k, v, aux, spec: Spec) -> torch.Tensor:
        kw = {}
        if spec.kind == "mllama":
            kw = {"kv_ranges": aux["ranges"].cpu(), "masked_rows": "uniform"}
        elif spec.kind == "packed":
            kw = {"cu_seqlens_q": aux["cu"].cpu(), "cu_seqlens_k": aux["cu"].cpu()}
        elif spec.kind == "prefix_lm":
            kw = {"mode": "prefix_lm", "prefix_len": aux["prefix"].cpu()}
        return ref.cross_attention(q, k, v, **kw).to(q.dtype)

    return attend
