"""Patch-embedding bench: vlmkern vs the HF module (Conv2d / Conv3d, TF32 off), the peers'
unfold + F.linear + add recipe, and torch.mm on the pre-unfolded matrix (the GEMM roofline), on
CLIP-L/14-336, SigLIP-so400m/14-384, InternViT-448, Qwen2-VL and Qwen3-VL shapes. The "uint8"
cases feed raw decoded pixels with CLIP's mean / std / 1/255: vlmkern folds them into its GEMM,
HF conv and unfold + linear normalize first (so there they are the issue's "unfold + linear + add
+ normalize" recipe).
``vlmkern.implicit`` (CUDA, sm_90a) is the implicit-GEMM kernel in image mode and, on Qwen3-VL's
packed rows, one GEMM computing the bilinear positions in its epilogue, for the A/B against the
default paths (patchify + cuBLASLt; the position-rows kernel + cuBLASLt)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlmkern.bench.harness import MM, Case, Config, env_var

NAME = "patch_embed"
BASELINE = "unfold+linear"
EXACT = False  # GEMMs with different summation orders: checked with a tolerance
MM_UNPADDED = "torch.mm K unpadded"
# torch.mm on the pre-unfolded matrix, padded and not: timed, not compared with the reference
ROOFLINES = (MM, MM_UNPADDED)


# ---- image mode: inputs (pixels (B, 3, H, W), weight, bias, pos (L, D), cls, Xpre, Wt) --------

def _image_case(label: str, batch: int, size: int, patch: int, dim: int, bias: bool, cls: bool,
                cfg: Config, norm=None) -> Case:
    """Float pixels (B, 3, H, W) in the model's dtype, or with `norm` = (mean, std, rescale) raw
    uint8 ones as decoded (the providers get norm=: vlmkern folds it into its GEMM, the others
    normalize first)."""
    dev, dt = cfg.device, cfg.dtype
    grid = size // patch
    k, tokens = 3 * patch * patch, grid * grid

    def make() -> tuple:
        if norm is None:
            pixels = torch.randn(batch, 3, size, size, device=dev, dtype=dt)
        else:
            pixels = torch.randint(0, 256, (batch, 3, size, size), device=dev, dtype=torch.uint8)
        weight = torch.randn(dim, 3, patch, patch, device=dev, dtype=dt) * k**-0.5
        b = torch.randn(dim, device=dev, dtype=dt) if bias else None
        pos = torch.randn(tokens + int(cls), dim, device=dev, dtype=dt)
        c = torch.randn(dim, device=dev, dtype=dt) if cls else None
        floats = pixels if norm is None else _normalize(pixels, norm, dt)
        return pixels, weight, b, pos, c, _unfolded(floats, weight)

    elt = torch.empty((), dtype=dt).element_size()
    pixel_bytes = batch * 3 * size * size * (elt if norm is None else 1)
    nbytes = pixel_bytes + (dim * k + batch * (tokens + int(cls)) * dim) * elt
    flops = 2 * batch * tokens * k * dim
    kind = "" if norm is None else " uint8"
    return Case(f"{label}{kind} B{batch} {size}px P{patch} D{dim}", make, nbytes,
                kwargs={} if norm is None else {"norm": norm}, flops=flops)


# CLIP's image-processor normalization (OpenAI mean / std, 1/255 rescale) for the uint8 cases.
CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), 1 / 255)


def _uint8_case(label: str, batch: int, size: int, patch: int, dim: int, bias: bool, cls: bool,
                cfg: Config) -> Case:
    """Raw uint8 pixels with CLIP's normalization: vlmkern folds mean / std / rescale into its
    GEMM; the other providers normalize first (in fp32, then cast, as a GPU preprocessing step
    would) and then run their recipe."""
    return _image_case(label, batch, size, patch, dim, bias, cls, cfg, norm=CLIP_NORM)


def _norm_kwargs(norm) -> dict:
    """patch_embed's mean / std / rescale keywords for a (mean, std, rescale) or None."""
    return {} if norm is None else dict(zip(("mean", "std", "rescale"), norm, strict=True))


def _normalize(pixels: torch.Tensor, norm, dtype: torch.dtype) -> torch.Tensor:
    """(pixels · rescale - mean) / std per channel in fp32, cast to the model's dtype."""
    mean, std = (torch.tensor(v, device=pixels.device)[:, None, None] for v in norm[:2])
    return ((pixels.float() * norm[2] - mean) / std).to(dtype)


def _unfolded(pixels: torch.Tensor, weight: torch.Tensor) -> tuple:
    """The rooflines' operands: the patch matrix (M, K) and Wᵀ (K, D), K zero-padded to 16-byte
    rows as vlmkern's GEMM runs them (P = 14: 588 -> 592), then both unpadded."""
    dim, patch = weight.shape[0], weight.shape[-1]
    k = weight[0].numel()
    kp = -(-k // 8) * 8
    x = _crop(pixels, patch).unfold(2, patch, patch).unfold(3, patch, patch)
    xpre = x.permute(0, 2, 3, 1, 4, 5).reshape(-1, k)
    wpre = F.pad(weight.reshape(dim, k), (0, kp - k)).t().contiguous()
    wk = weight.reshape(dim, k).t().contiguous()
    return F.pad(xpre, (0, kp - k)).contiguous(), wpre, xpre.contiguous(), wk


def _crop(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    h, w = pixels.shape[-2:]
    return pixels[..., : h // patch * patch, : w // patch * patch]


def vlmkern_image(pixels, weight, bias, pos, cls, pre, norm=None):
    import vlmkern.ops

    return vlmkern.ops.patch_embed(pixels, weight, bias, pos_embed=pos, cls_token=cls, crop=True,
                                   **_norm_kwargs(norm))  # fmt: skip


def vlmkern_implicit_image(pixels, weight, bias, pos, cls, pre, norm=None):
    """vlmkern with ``VLMKERN_PATCH_EMBED_GEMM=implicit``: one wgmma kernel gathers the patch rows
    from the pixels itself (sm_90a; elsewhere the op falls back to the default path)."""
    with env_var("VLMKERN_PATCH_EMBED_GEMM", "implicit"):
        return vlmkern_image(pixels, weight, bias, pos, cls, pre, norm)


def has_sm90_kernels() -> bool:
    """The build has the sm_90a CuTe kernels and GPU 0 runs them (elsewhere an implicit provider
    would time the default path under its name)."""
    from vlmkern import _C

    return bool(getattr(_C, "cutlass_gemm", 0)) and torch.cuda.get_device_capability() == (9, 0)


def vlmkern_implicit_packed(patches, weight, bias, pos, grid, pre, merge):
    """``VLMKERN_PATCH_EMBED_GEMM=implicit`` on packed rows: with Qwen3-VL's table, one wgmma GEMM
    whose epilogue computes the positions + bias. Raises ValueError (the harness skips the
    provider) without a table (Qwen2-VL: the op runs the default GEMM)."""
    if pos is None:
        raise ValueError("no position table: the default path runs")
    with env_var("VLMKERN_PATCH_EMBED_GEMM", "implicit"):
        return vlmkern_packed(patches, weight, bias, pos, grid, pre, merge)


def unfold_linear_image(pixels, weight, bias, pos, cls, pre, norm=None):
    """The peers' recipe: (normalize,) unfold to the patch matrix, F.linear, cat CLS, add
    positions."""
    if norm is not None:
        pixels = _normalize(pixels, norm, weight.dtype)
    d, p = weight.shape[0], weight.shape[-1]
    b = pixels.shape[0]
    x = _crop(pixels, p).unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5)
    y = F.linear(x.reshape(b, -1, weight[0].numel()), weight.reshape(d, -1), bias)
    if cls is not None:
        y = torch.cat([cls.expand(b, 1, d), y], dim=1)
    return y + pos


def hf_image(pixels, weight, bias, pos, cls, pre, norm=None):
    """HF's CLIP / SigLIP / InternViT embeddings: (normalize,) Conv2d, flatten, cat CLS, add
    positions."""
    if norm is not None:
        pixels = _normalize(pixels, norm, weight.dtype)
    y = F.conv2d(pixels, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    if cls is not None:
        y = torch.cat([cls.expand(y.shape[0], 1, -1), y], dim=1)
    return y + pos


# ---- packed (Qwen) mode: inputs (patches (N, K), weight (D, 3, 2, P, P), bias, grid, pos) -------

def _packed_case(label: str, grids: list[tuple[int, int, int]], patch: int, dim: int, qwen3: bool,
                 cfg: Config) -> Case:
    dev, dt = cfg.device, cfg.dtype
    k = 3 * 2 * patch * patch
    grid = torch.tensor(grids, device=dev)
    n = sum(t * h * w for t, h, w in grids)

    def make() -> tuple:
        patches = torch.randn(n, k, device=dev, dtype=dt)
        weight = torch.randn(dim, 3, 2, patch, patch, device=dev, dtype=dt) * k**-0.5
        bias = torch.randn(dim, device=dev, dtype=dt) if qwen3 else None
        pos = torch.randn(48 * 48, dim, device=dev, dtype=dt) if qwen3 else None
        return patches, weight, bias, pos, grid, (patches, weight.reshape(dim, k).t().contiguous())

    elt = torch.empty((), dtype=dt).element_size()
    return Case(f"{label} N{n} K{k} D{dim}", make, (n * k + dim * k + n * dim) * elt,
                kwargs={"merge": 2}, flops=2 * n * k * dim)


def vlmkern_packed(patches, weight, bias, pos, grid, pre, merge):
    import vlmkern.ops

    return vlmkern.ops.patch_embed(patches, weight, bias, pos_embed=pos, grid_thw=grid,
                                   spatial_merge_size=merge)[0]


def _qwen3_pos(pos, grid, merge):
    """HF Qwen3VLVisionModel's positions: gather 4 taps per patch, weight, sum (fp32), cast."""
    try:
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights
    except ImportError:  # older transformers: the reference's per-image resize
        from vlmkern.reference.patch_embed import qwen3_positions

        return qwen3_positions(pos, grid.cpu(), merge).to(pos.device)
    idx, w = get_vision_interpolation_indices_and_weights(
        grid, int(pos.shape[0] ** 0.5), mode="bilinear", align_corners=True,
        spatial_merge_size=merge)
    return (F.embedding(idx, pos) * w[:, :, None]).sum(1).to(pos.dtype)


def unfold_linear_packed(patches, weight, bias, pos, grid, pre, merge):
    y = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)
    return y if pos is None else y + _qwen3_pos(pos, grid, merge)


def hf_packed(patches, weight, bias, pos, grid, pre, merge):
    """HF Qwen2-VL PatchEmbed / Qwen3VLVisionPatchEmbed (+ its interpolated pos_embed)."""
    _, c, t, p, _ = weight.shape
    y = F.conv3d(patches.view(-1, c, t, p, p), weight, bias, stride=(t, p, p))
    y = y.view(-1, weight.shape[0])
    return y if pos is None else y + _qwen3_pos(pos, grid, merge)


def mm_roofline(*args, **kwargs):
    """torch.mm on the pre-unfolded (M, K) matrix, K zero-padded to a multiple of 8 as vlmkern
    runs it (P = 14: 588 -> 592, 16-byte rows): the GEMM alone, no patchify, bias or positions."""
    return torch.mm(args[5][0], args[5][1])


def mm_unpadded(*args, **kwargs):
    """The same GEMM on the unpadded (M, K) rows (P = 14: 1176-byte, 8-byte aligned rows), to
    show what the padding buys; packed rows are never padded (K = 1176 / 1536)."""
    pre = args[5]
    return torch.mm(pre[2], pre[3]) if len(pre) == 4 else torch.mm(pre[0], pre[1])



def cases(cfg: Config) -> list[Case]:
    """GPU: CLIP-L/14-336 B 1..64, SigLIP-so400m/14-384, InternViT-448 (B 1, 12), Qwen2-VL one
    1344² image and a mixed batch of ~16k patches, Qwen3-VL. CPU: a few of them at small B."""
    clip = [("clip-l14-336", 336, 14, 1024, False, True)]
    siglip = ("siglip-so400m", 384, 14, 1152, True, False)
    intern = ("internvit-448", 448, 14, 1024, True, True)
    mixed = [(1, 96, 96), (1, 48, 64), (1, 34, 52), (1, 64, 32), (1, 28, 28), (1, 16, 24),
             (1, 12, 8)]  # 16,384 patches
    if cfg.device == "cuda":
        out = [_image_case(*c[:1], b, *c[1:], cfg) for c in clip for b in (1, 8, 32, 64)]
        out += [_image_case(siglip[0], b, *siglip[1:], cfg) for b in (1, 16)]
        out += [_image_case(intern[0], b, *intern[1:], cfg) for b in (1, 12)]
        out += [_uint8_case(*c[:1], b, *c[1:], cfg) for c in clip for b in (1, 32)]
        out += [_packed_case("qwen2-vl 1344px", [(1, 96, 96)], 14, 1280, False, cfg),
                _packed_case("qwen2-vl mixed", mixed, 14, 1280, False, cfg),
                _packed_case("qwen3-vl mixed", mixed, 16, 1152, True, cfg)]
        return out[:3] + out[-2:] if cfg.quick else out
    out = [_image_case(clip[0][0], b, *clip[0][1:], cfg) for b in (1, 4)]
    if cfg.quick:
        return out[:1] + [_packed_case("qwen2-vl 448x644", [(1, 32, 46)], 14, 1280, False, cfg)]
    return out + [_uint8_case(clip[0][0], 1, *clip[0][1:], cfg),
                  _image_case(siglip[0], 1, *siglip[1:], cfg),
                  _image_case(intern[0], 1, *intern[1:], cfg),
                  _packed_case("qwen2-vl 448x644", [(1, 32, 46)], 14, 1280, False, cfg),
                  _packed_case("qwen3-vl 512x768", [(1, 32, 48)], 16, 1152, True, cfg)]


class _Dispatch:
    """One provider over both input kinds (packed cases pass merge= as a keyword)."""

    def __init__(self, image: Callable, packed: Callable) -> None:
        self.image, self.packed = image, packed

    def __call__(self, *args, **kwargs):
        if "merge" in kwargs:
            return self.packed(*args, **kwargs)
        return self.image(*args, **kwargs)  # norm= on the uint8 cases


def providers(cfg: Config) -> dict[str, Callable]:
    if cfg.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    out = {
        "vlmkern": _Dispatch(vlmkern_image, vlmkern_packed),
        "HF conv": _Dispatch(hf_image, hf_packed),
        "unfold+linear": _Dispatch(unfold_linear_image, unfold_linear_packed),
        MM: mm_roofline,
        MM_UNPADDED: mm_unpadded,
    }
    if cfg.device == "cuda" and has_sm90_kernels():
        out["vlmkern.implicit"] = _Dispatch(vlmkern_implicit_image, vlmkern_implicit_packed)
    return out


def reference() -> Callable:
    import vlmkern.reference

    def ref(pixels, weight, bias, pos, cls_or_grid, pre, merge=None, norm=None):
        if merge is not None:
            return vlmkern.reference.patch_embed(pixels, weight, bias, pos_embed=pos,
                                                 grid_thw=cls_or_grid, spatial_merge_size=merge)[0]
        return vlmkern.reference.patch_embed(_crop(pixels, weight.shape[-1]), weight, bias,
                                             pos_embed=pos, cls_token=cls_or_grid,
                                             **_norm_kwargs(norm))  # fmt: skip

    return ref
