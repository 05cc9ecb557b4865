"""Small smoke run of every vlmkern op, forward (and backward where it has one), checked against
vlmkern.reference; run under compute-sanitizer by bench/gpu_check.sh (TESTING.md G10). Usage:
python3 sanitizer_smoke.py [--device cuda|cpu]. Inputs are made on the CPU and copied over so that,
besides our kernels, the GPU runs little more than the copies autograd needs; comparisons happen
on the CPU."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

import vlmkern
import vlmkern.ops
import vlmkern.reference
from vlmkern.bench.harness import env_var

DTYPES = (torch.bfloat16, torch.float32)
LAYOUTS = ("contiguous", "cls_dropped", "channel_strided")


def make_input(shape: tuple[int, ...], layout: str,
               dtype: torch.dtype) -> tuple[torch.Tensor, Callable]:
    """A CPU tensor `base` and the view taking base (or its device copy) to the op's input.

    contiguous: (B, H, W, C) as is. cls_dropped: (B, 1 + H*W, C)[:, 1:] with grid=(H, W), the ViT
    output with CLS dropped. channel_strided: (B, H*W, 2C)[..., ::2] with grid, stride 2 in C."""
    b, h, w, c = shape
    if layout == "contiguous":
        base_shape, view = (b, h, w, c), (lambda t: t)
    elif layout == "cls_dropped":
        base_shape, view = (b, 1 + h * w, c), (lambda t: t[:, 1:])
    else:
        base_shape, view = (b, h * w, 2 * c), (lambda t: t[..., ::2])
    base_cpu = torch.randn(base_shape, dtype=torch.float32).to(dtype)
    return base_cpu, view


def run_case(op: str, shape: tuple[int, ...], scale: int, dtype: torch.dtype, layout: str,
             device: str) -> None:
    b, h, w, c = shape
    if layout == "contiguous":
        grid = None
    elif op == "pixel_shuffle":
        grid = (h, w)
    else:  # pixel_unshuffle's grid is the unshuffled (output) grid
        grid = (h * scale, w * scale)
    base_cpu, view = make_input(shape, layout, dtype)
    fn = getattr(vlmkern.ops, op)
    ref_fn = getattr(vlmkern.reference, op)

    base_ref = base_cpu.clone().requires_grad_(True)
    ref = ref_fn(view(base_ref), scale, grid)
    grad_out = torch.randn(ref.shape, dtype=torch.float32).to(dtype)
    ref.backward(grad_out)
    if b > 0:
        assert ref.detach().float().abs().sum() > 0, "vacuous reference"

    base = base_cpu.to(device).requires_grad_(True)
    out = fn(view(base), scale, grid)
    out.backward(grad_out.to(device))
    what = f"{op} {layout} shape={shape} r={scale} {dtype}"
    got, got_grad = out.detach().cpu(), base.grad.cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.equal(got, ref.detach()), f"{what}: forward differs from reference"
    assert torch.equal(got_grad, base_ref.grad), f"{what}: backward differs from reference"


def pixel_shuffle_cases() -> list[tuple]:
    """(op, input shape (B, H, W, C) of the op's 4-D form, scale) on small odd sizes."""
    cases = []
    for r in (2, 3):
        cases.append(("pixel_shuffle", (3, 3 * r, 5 * r, 7), r))
        cases.append(("pixel_unshuffle", (3, 3, 5, 7 * r * r), r))
    return cases


def smoke_pixel_shuffle(device: str) -> int:
    """pixel_shuffle and pixel_unshuffle: every dtype x layout on small odd sizes, plus B=0."""
    n = 0
    for op, shape, scale in pixel_shuffle_cases():
        for dtype in DTYPES:
            for layout in LAYOUTS:
                run_case(op, shape, scale, dtype, layout, device)
                n += 1
        run_case(op, (0, *shape[1:]), scale, torch.float32, "contiguous", device)
        n += 1
    return n


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    tol = 1e-5 if got.dtype == torch.float32 else 2e-2
    err = (got.cpu().double() - ref.double()).abs().max().item() if got.numel() else 0.0
    scale = max(ref.double().abs().max().item(), 1.0) if ref.numel() else 1.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} (tolerance {tol * scale:.3g})"


def smoke_rope(device: str) -> int:
    """rope / rope_ / rope_backward / rope_cos_sin(+_backward) through the public wrappers:
    M-RoPE sectioned + interleaved (bhsd, packed, partial rotary), vision RoPE, HF cos/sin."""
    n = 0
    for dtype in DTYPES:
        qkv = torch.randn(2, 13, (4 + 2 * 2) * 64).to(dtype)  # fused qkv: strided q and k views
        q = qkv[..., : 4 * 64].unflatten(-1, (4, 64)).transpose(1, 2)
        k = qkv[..., 4 * 64 : 6 * 64].unflatten(-1, (2, 64)).transpose(1, 2)
        pos = torch.randint(0, 3000, (3, 2, 13))
        for sec, inter, rot in (([8, 12, 12], False, None), ([12, 10, 10], True, None),
                                ([4, 6, 6], False, 32)):
            what = f"mrope {sec} interleaved={inter} rotary_dim={rot} {dtype}"
            ref = vlmkern.reference.mrope(q, k, pos, sec, 1e6, inter, rot)
            qd = q.to(device).detach().requires_grad_(True)
            kd = k.to(device).detach().requires_grad_(True)
            out = vlmkern.ops.mrope(qd, kd, pos.to(device), sec, 1e6, inter, rot)
            (out[0].float().sum() + out[1].float().square().sum()).backward()
            _close(out[0].detach(), ref[0], what)
            _close(out[1].detach(), ref[1], what)
            qi, ki = q.to(device).clone(), k.to(device).clone()
            vlmkern.ops.mrope_(qi, ki, pos.to(device), sec, 1e6, inter, rot)
            _close(qi, ref[0], what + " in place")
            n += 2
        qp, kp = torch.randn(40, 3, 80).to(dtype), torch.randn(40, 3, 80).to(dtype)
        hw = torch.randint(0, 30, (40, 2))
        ref = vlmkern.reference.vision_rope(qp, kp, hw)
        out = vlmkern.ops.vision_rope(qp.to(device), kp.to(device), hw.to(device))
        _close(out[0], ref[0], f"vision_rope {dtype}")
        cos, sin = torch.randn(2, 13, 64), torch.randn(2, 13, 64)
        ref = vlmkern.reference.apply_rotary_pos_emb(q, k, cos, sin)
        qd = q.to(device).detach().requires_grad_(True)
        out = vlmkern.ops.apply_rotary_pos_emb(qd, k.to(device), cos.to(device), sin.to(device))
        out[0].float().sum().backward()
        _close(out[0].detach(), ref[0], f"apply_rotary_pos_emb {dtype}")
        n += 2
    return n


def run_mrope_smoke(device: str) -> int:
    """mrope_position_ids (integer op, no backward) on left-padded image / video batches of every
    model and rule, also with int32 tokens and a bool mask, against the reference; returns the
    number of cases run."""
    from vlmkern.bench.mrope_position_ids import make_batch

    rows = [[3, ("image", 1, 4, 6), 2, ("video", 3, 4, 2), 1], [5],
            [1, ("video", 2, 2, 2), 2, ("image", 1, 2, 2), 4]]  # fmt: skip
    n = 0
    for model in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        for rule in ("hf", "max_plus_one"):
            for narrow in (False, True):
                ids, types_, images, videos, mask = make_batch(rows, model, "cpu", n)
                if narrow:
                    types_, mask = types_.int(), mask.bool()
                kw = {"model": model, "text_after_video": rule}
                if model == "qwen2_5_vl":
                    kw["second_per_grid_ts"] = torch.tensor([0.5, 2 / 3])
                ref = vlmkern.reference.mrope_position_ids(ids, types_, images, videos, mask, **kw)
                dev = [t.to(device) for t in (ids, types_, images, videos, mask)]
                kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
                got = vlmkern.ops.mrope_position_ids(*dev, **kw)
                what = f"mrope_position_ids {model} {rule} narrow={narrow}"
                for g, r in zip(got, ref, strict=True):
                    assert torch.equal(g.cpu(), r), f"{what}: differs from reference"
                n += 1
    return n


def smoke_mlp_projector(device: str) -> int:
    """mlp_projector forward + backward (every gradient) on small odd sizes: LLaVA (quick_gelu),
    InternVL (CLS-dropped grid, post LayerNorm), Qwen2.5-VL (RMSNorm, merge), Qwen3-VL DeepStack,
    Idefics3 (r = 3, one Linear, no bias), an empty batch, InternVL at C = 16 (CUDA's fused
    shuffle + LayerNorm kernel); bf16 and fp32, against the reference
    (gradients through the reference's autograd on the CPU)."""
    c, n1, d = 7, 13, 11
    connectors = [  # (x shape as made, kwargs, features normalized)
        ((2, 9, c), {"activation": "quick_gelu"}, 0),
        ((2, 1 + 6 * 4, c), {"norm": "layernorm", "norm_position": "post", "shuffle": 2,
                             "grid": (6, 4)}, 4 * c),
        ((4 * 5, c), {"norm": "rmsnorm", "eps": 1e-6, "merge": 2}, c),
        ((4 * 3, c), {"norm": "layernorm", "norm_position": "post", "merge": 2}, 4 * c),
        ((1, 1 + 6 * 6, c), {"activation": "none", "shuffle": 3, "grid": (6, 6)}, 0),
        ((0, 5, c), {}, 0),
        # C a multiple of 8: CUDA's one-kernel pixel shuffle + LayerNorm
        ((2, 1 + 4 * 6, 16), {"norm": "layernorm", "norm_position": "post", "shuffle": 2,
                              "grid": (4, 6)}, 4 * 16),
    ]  # fmt: skip
    n = 0
    for dtype in DTYPES:
        for shape, kw, features in connectors:
            f = kw.get("shuffle") or kw.get("merge") or 1
            single = kw.get("shuffle") == 3
            k = shape[-1] * f * f
            params = {"w1": torch.randn(n1, k) * k**-0.5,
                      "b1": None if single else torch.randn(n1),
                      "w2": None if single else torch.randn(d, n1) * n1**-0.5,
                      "b2": None if single else torch.randn(d),
                      "norm_weight": 1 + 0.1 * torch.randn(features) if features else None,
                      "norm_bias": 0.1 * torch.randn(features)
                      if kw.get("norm") == "layernorm" else None}  # fmt: skip
            params = {k: v.to(dtype) if v is not None else None for k, v in params.items()}
            base = torch.randn(shape).to(dtype)
            view = (lambda t: t[:, 1:]) if "grid" in kw else (lambda t: t)
            names = ["x", *(k for k, v in params.items() if v is not None)]
            ref_leaves = [base.clone().requires_grad_()] + [
                params[k].clone().requires_grad_() for k in names[1:]]
            dev_leaves = [t.detach().to(device).requires_grad_() for t in ref_leaves]
            outs = []
            for fn, leaves in ((vlmkern.reference.mlp_projector, ref_leaves),
                               (vlmkern.ops.mlp_projector, dev_leaves)):  # fmt: skip
                p = {**dict.fromkeys(params), **dict(zip(names[1:], leaves[1:], strict=True))}
                out = fn(view(leaves[0]), p.pop("w1"), p.pop("b1"), p.pop("w2"), p.pop("b2"),
                         **p, **kw)  # fmt: skip
                out.backward(torch.ones(out.shape).to(dtype).to(out.device))
                outs.append(out.detach())
            what = f"mlp_projector {kw} {dtype}"
            _close(outs[1], outs[0], what)
            for name, r, g in zip(names, ref_leaves, dev_leaves, strict=True):
                _close(g.grad, r.grad, f"{what} grad {name}")
            n += 1
    return n + _smoke_projector_cutlass(device) + _smoke_projector_shuffle_gemm(device)


def _smoke_projector_shuffle_gemm(device: str) -> int:
    """The pixel-shuffle GEMM (VLMKERN_PROJECTOR_SHUFFLE_GEMM=fused; sm_90a only): Idefics3-style
    r = 3 on a CLS-dropped grid (C = 24: K = 216, a partial k tile; N = 136: a partial n tile),
    r = 2 with bias, GELU and a second Linear, InternVL's post-shuffle LayerNorm applied inside
    the GEMM (statistics pass + normalized A tiles), and Qwen mergers' per-token LayerNorm /
    RMSNorm likewise on the merged rows."""
    if device != "cuda" or torch.cuda.get_device_capability() != (9, 0):
        return 0
    n = 0
    with env_var("VLMKERN_PROJECTOR_SHUFFLE_GEMM", "fused"):
        for r, second, norm in ((3, False, False), (2, True, False), (2, True, True)):
            c, n1, d, side = 24, 136, 40, 6
            base = torch.randn(2, 1 + side * side, c).to(torch.bfloat16)
            k = r * r * c
            w1 = (torch.randn(n1, k) * k**-0.5).to(torch.bfloat16)
            b1, w2, b2 = ((torch.randn(n1), torch.randn(d, n1) * n1**-0.5, torch.randn(d))
                          if second else (None, None, None))
            args = [t.to(torch.bfloat16) if t is not None else None for t in (w1, b1, w2, b2)]
            kw = {"activation": "gelu" if second else "none", "shuffle": r, "grid": (side, side)}
            if norm:
                kw.update(norm="layernorm", norm_position="post",
                          norm_weight=(1 + 0.2 * torch.randn(k)).to(torch.bfloat16),
                          norm_bias=(0.2 * torch.randn(k)).to(torch.bfloat16))
            ref = vlmkern.reference.mlp_projector(base[:, 1:], *args, **kw)
            kwd = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
            out = vlmkern.ops.mlp_projector(
                base.to(device)[:, 1:], *[t.to(device) if t is not None else None for t in args],
                **kwd)  # fmt: skip
            _close(out, ref, f"mlp_projector shuffle GEMM r={r} second={second} norm={norm}")
            n += 1
        for norm in ("layernorm", "rmsnorm"):  # Qwen mergers: per-token norm, the merged rows
            x = torch.randn(4 * 37, 24).to(torch.bfloat16)  # 37 rows of K = 96
            w1, w2 = torch.randn(136, 96) * 96**-0.5, torch.randn(40, 136) * 136**-0.5
            args = [t.to(torch.bfloat16) for t in (w1, torch.randn(136), w2, torch.randn(40))]
            kw = {"activation": "gelu", "merge": 2, "norm": norm, "eps": 1e-6,
                  "norm_weight": (1 + 0.2 * torch.randn(24)).to(torch.bfloat16),
                  "norm_bias": (0.2 * torch.randn(24)).to(torch.bfloat16)
                  if norm == "layernorm" else None}  # fmt: skip
            ref = vlmkern.reference.mlp_projector(x, *args, **kw)
            kwd = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
            out = vlmkern.ops.mlp_projector(x.to(device), *[t.to(device) for t in args], **kwd)
            _close(out, ref, f"mlp_projector shuffle GEMM merger {norm}")
            n += 1
    return n


def _smoke_projector_cutlass(device: str) -> int:
    """The fused CUTLASS GEMM path (VLMKERN_PROJECTOR_GEMM=cutlass; sm_90a builds on an H100 /
    H200 only): GELU + aux and identity epilogues, bias and none, tile-edge sizes, strided rows."""
    from vlmkern import _C

    if device != "cuda" or not _C.cutlass_gemm or torch.cuda.get_device_capability() != (9, 0):
        return _smoke_projector_cutlass_sm80(device)
    if os.environ.get("VLMKERN_SANITIZER_TOOL") == "initcheck":
        # initcheck does not see the kernel's TMA stores: it flags the whole output as
        # uninitialized when it is read back (the first H100 run), and its report floods the
        # stage's time. memcheck, racecheck and synccheck still run this case.
        print("sanitizer_smoke: CUTLASS case skipped under initcheck (TMA stores are not tracked)",
              file=sys.stderr)
        return _smoke_projector_cutlass_sm80(device)
    n = 0
    with env_var("VLMKERN_PROJECTOR_GEMM", "cutlass"):
        k, n1, d = 136, 264, 72  # multiples of 8, off the 128 x 128 x 64 tiles
        for dtype in (torch.bfloat16, torch.float16):
            for rows, act, bias in ((113, "gelu", True), (1, "gelu", False), (200, "none", True)):
                base = torch.randn(1 + rows, k + 8).to(dtype)
                x = base[1:, :k]  # CLS-dropped rows, row stride K + 8 (kept on the device)
                w1, w2 = torch.randn(n1, k) * k**-0.5, torch.randn(d, n1) * n1**-0.5
                b1, b2 = (torch.randn(n1), torch.randn(d)) if bias else (None, None)
                args = [t.to(dtype) if t is not None else None for t in (w1, b1, w2, b2)]
                ref = vlmkern.reference.mlp_projector(x, *args, activation=act)
                out = vlmkern.ops.mlp_projector(
                    base.to(device)[1:, :k], *[t.to(device) if t is not None else None
                                               for t in args], activation=act)  # fmt: skip
                _close(out, ref, f"mlp_projector cutlass {act} bias={bias} M={rows} {dtype}")
                n += 1
    return n + _smoke_projector_cutlass_sm80(device)


def _smoke_projector_cutlass_sm80(device: str) -> int:
    """The sm_80+ CUTLASS 2.x GEMM (VLMKERN_PROJECTOR_GEMM=cutlass_sm80): GELU + aux and identity
    epilogues on CLS-dropped strided rows, M off the 128-row tiles (cp.async and plain stores:
    initcheck sees them)."""
    from vlmkern import _C

    if device != "cuda" or not getattr(_C, "cutlass_sm80_gemm", 0):
        return 0
    n = 0
    with env_var("VLMKERN_PROJECTOR_GEMM", "cutlass_sm80"):
        k, n1, d = 136, 264, 72
        for rows in (113, 1):
            base = torch.randn(1 + rows, k + 8).to(torch.bfloat16)
            w1, w2 = torch.randn(n1, k) * k**-0.5, torch.randn(d, n1) * n1**-0.5
            args = [t.to(torch.bfloat16) for t in (w1, torch.randn(n1), w2, torch.randn(d))]
            ref = vlmkern.reference.mlp_projector(base[1:, :k], *args, activation="gelu")
            out = vlmkern.ops.mlp_projector(base.to(device)[1:, :k],
                                            *[t.to(device) for t in args], activation="gelu")
            _close(out, ref, f"mlp_projector cutlass_sm80 M={rows}")
            n += 1
    return n


def smoke_cross_attention(device: str) -> int:
    """cross_attention on Mllama ranges (both masked-row behaviours), Q-Former shared queries,
    packed segments (an empty q segment) and prefix-LM, and mllama_kv_ranges, against the
    reference. CPU: fp32 / bf16, forward + backward (finite gradients). CUDA (flash-attention 2
    forward and backward kernels): bf16 and fp16, forward + backward, gradients against the
    float64 reference's; the forward runs its 32-row CTAs on the Sq <= 32 cases (ranges, Q-Former,
    packed) and its 64-row CTAs on prefix-LM's 70 rows."""
    if device == "cuda" and "cuda" not in vlmkern.info()["ops"]["cross_attention"]:
        print("sanitizer_smoke: cross_attention has no CUDA kernel in this build; checking its "
              "CPU path only", file=sys.stderr)
        device = "cpu"
    cuda = device == "cuda"
    n = 0
    mask = torch.zeros(2, 9, 2, 2, dtype=torch.int64)
    mask[:, 2:, 0, :1] = 1
    mask[:, 5:, 1, :] = 1
    ranges = vlmkern.ops.mllama_kv_ranges(mask.to(device), 7)
    assert torch.equal(ranges.cpu(), vlmkern.reference.mllama_kv_ranges(mask, 7))
    cq, ck = torch.tensor([0, 3, 3, 10], dtype=torch.int32), torch.tensor([0, 5, 9, 20],
                                                                          dtype=torch.int32)
    cases = [  # (q, k, v, kwargs); head dims the CUDA kernel takes (64, 80, 72)
        (torch.randn(2, 8, 9, 64), torch.randn(2, 2, 28, 64), torch.randn(2, 2, 28, 64),
         {"kv_ranges": ranges.cpu(), "masked_rows": "zero"}),
        (torch.randn(2, 8, 9, 64), torch.randn(2, 2, 28, 64), torch.randn(2, 2, 28, 64),
         {"kv_ranges": ranges.cpu(), "masked_rows": "uniform"}),
        (torch.randn(1, 4, 32, 64).expand(3, -1, -1, -1), torch.randn(3, 4, 57, 64),
         torch.randn(3, 4, 57, 64), {}),
        (torch.randn(10, 4, 80), torch.randn(20, 2, 80), torch.randn(20, 2, 80),
         {"cu_seqlens_q": cq, "cu_seqlens_k": ck}),
        (torch.randn(2, 4, 70, 72), torch.randn(2, 1, 70, 72), torch.randn(2, 1, 70, 72),
         {"mode": "prefix_lm", "prefix_len": torch.tensor([0, 12])}),
    ]
    for dtype in (torch.bfloat16, torch.float16) if cuda else DTYPES:
        for q, k, v, kw in cases:
            q, k, v = (t.to(dtype) for t in (q, k, v))
            ref = vlmkern.reference.cross_attention(q, k, v, **kw).float()
            dev = [t.to(device).detach().requires_grad_() for t in (q, k, v)]
            kwd = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
            out = vlmkern.ops.cross_attention(*dev, **kwd)
            _close(out.detach(), ref, f"cross_attention {sorted(kw)} {dtype}")
            out.float().square().sum().backward()
            assert all(torch.isfinite(t.grad).all() for t in dev), "non-finite gradient"
            if cuda:
                ref_in = [t.double().requires_grad_() for t in (q, k, v)]
                vlmkern.reference.cross_attention(*ref_in, **kw).square().sum().backward()
                for name, t, r in zip("qkv", dev, ref_in, strict=True):
                    _close(t.grad, r.grad, f"cross_attention d{name} {sorted(kw)} {dtype}")
            n += 1
    if cuda:  # forward-only runs of the CUDA kernel's switches, bf16, against the reference
        def check_bf16(picked, what):
            for q, k, v, kw in picked:
                q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
                ref = vlmkern.reference.cross_attention(q, k, v, **kw).float()
                kwd = {n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
                out = vlmkern.ops.cross_attention(q.cuda(), k.cuda(), v.cuda(), **kwd)
                _close(out, ref, f"cross_attention {what} {sorted(kw)}")
            return len(picked)

        # split-KV runs + the combine kernel (1-2 key tiles in 3 runs: some are empty)
        with env_var("VLMKERN_XATTN_SPLITS", "3"):
            n += check_bf16((cases[0], cases[1], cases[4]), "split-KV")
        shapes = (("VLMKERN_XATTN_BLOCK_M", "64"), ("VLMKERN_XATTN_BLOCK_M", "128"),
                  ("VLMKERN_XATTN_WARP_ROWS", "32"))  # 4 warps x 32 rows
        for var, rows in shapes:  # forced CTA shapes (small cases default to 32 rows)
            with env_var(var, rows):  # head dim 64: every height has an instance
                n += check_bf16(cases[:3], f"{var}={rows}")
        with env_var("VLMKERN_XATTN_IMAGES_PER_CTA", "2"):  # 3 images: a short last CTA
            # per-image queries; broadcast queries
            n += check_bf16((cases[0], cases[2]), "2 images per CTA")
    return n


def smoke_patch_embed(device: str) -> int:
    """patch_embed (image: CLIP / SigLIP flavours, NCHW and NHWC, resized positions, uint8 +
    folded normalization), packed Qwen3-VL rows and a list of differently sized images, forward +
    backward, against the reference."""
    n = 0
    for dtype in DTYPES:
        for cls, bias, layout in ((True, False, "nchw"), (False, True, "nhwc")):
            x = torch.randn(2, 3, 21, 14).to(dtype)
            w, b = (torch.randn(16, 3, 7, 7) * 0.1).to(dtype), torch.randn(16).to(dtype)
            pos, c = torch.randn(9 + cls, 16).to(dtype), torch.randn(16).to(dtype)
            kw = {"pos_embed": pos, "cls_token": c if cls else None}
            bias_t = b if bias else None
            ref = vlmkern.reference.patch_embed(x, w, bias_t, **kw)
            xd = (x.permute(0, 2, 3, 1) if layout == "nhwc" else x).to(device)
            xd = xd.detach().requires_grad_(True)
            wd = w.to(device).requires_grad_(True)
            kwd = {k: v.to(device) if v is not None else None for k, v in kw.items()}
            out = vlmkern.ops.patch_embed(xd, wd, bias_t.to(device) if bias else None,
                                          channels_last=layout == "nhwc", **kwd)
            out.float().square().sum().backward()
            _close(out.detach(), ref, f"patch_embed {layout} cls={cls} {dtype}")
            assert xd.grad is not None and wd.grad is not None
            n += 1
        u8 = torch.randint(0, 256, (2, 3, 14, 14), dtype=torch.uint8)
        norm = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.25], "rescale": 1 / 255}
        ref = vlmkern.reference.patch_embed(u8, w, b, **norm)
        _close(vlmkern.ops.patch_embed(u8.to(device), w.to(device), b.to(device), **norm), ref,
               f"patch_embed uint8 {dtype}")
        grid = torch.tensor([[1, 4, 6], [2, 2, 2]])
        rows = torch.randn(32, 3 * 2 * 4 * 4).to(dtype)
        w3, table = (torch.randn(16, 3, 2, 4, 4) * 0.1).to(dtype), torch.randn(36, 16).to(dtype)
        ref, ref_cu = vlmkern.reference.patch_embed(rows, w3, b, pos_embed=table, grid_thw=grid,
                                                    spatial_merge_size=2)
        td = table.to(device).requires_grad_(True)
        out, cu = vlmkern.ops.patch_embed(rows.to(device), w3.to(device), b.to(device),
                                          pos_embed=td, grid_thw=grid.to(device),
                                          spatial_merge_size=2)
        out.float().sum().backward()
        _close(out.detach(), ref, f"patch_embed packed {dtype}")
        assert torch.equal(cu.cpu(), ref_cu) and td.grad is not None
        images = [torch.randn(3, h, w).to(dtype) for h, w in ((14, 21), (7, 7), (28, 14))]
        imd = [im.to(device).requires_grad_(True) for im in images]
        pos = torch.randn(10, 16).to(dtype)  # CLS row + a 3x3 table
        pos_d = pos.to(device).requires_grad_(True)
        out, cu = vlmkern.ops.patch_embed(imd, w.to(device), b.to(device), pos_embed=pos_d,
                                          cls_token=c.to(device))
        out.float().square().sum().backward()
        for i, im in enumerate(images):
            ref = vlmkern.reference.patch_embed(im[None], w, b, pos_embed=pos, cls_token=c)[0]
            _close(out.detach()[cu[i] : cu[i + 1]], ref, f"patch_embed varlen {i} {dtype}")
        assert all(im.grad is not None for im in imd) and pos_d.grad is not None
        n += 3
    if device == "cuda":  # the sm_90a implicit GEMM (elsewhere the default path runs again)
        x = torch.randn(3, 3, 42, 28).to(torch.bfloat16)  # M = 72 rows, D = 136: partial tiles
        u8 = torch.randint(0, 256, (3, 42, 28, 3), dtype=torch.uint8)
        w = (torch.randn(136, 3, 7, 7) * 0.1).to(torch.bfloat16)
        b, c = torch.randn(136).to(torch.bfloat16), torch.randn(136).to(torch.bfloat16)
        pos = torch.randn(25, 136).to(torch.bfloat16)  # CLS row + the 6 x 4 grid
        norm = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.25], "rescale": 1 / 255}
        cases = ((x, {"pos_embed": pos, "cls_token": c}),
                 (u8, {"pos_embed": pos[1:], "channels_last": True, **norm}))
        with env_var("VLMKERN_PATCH_EMBED_GEMM", "implicit"):  # forward and dW kernels
            for px, kw in cases:
                w_ref = w.clone().requires_grad_()
                ref = vlmkern.reference.patch_embed(px, w_ref, b, pos_interp="none", **kw)
                ref.float().square().sum().backward()
                kwd = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                       for k, v in kw.items()}
                wd = w.to(device).requires_grad_()
                out = vlmkern.ops.patch_embed(px.to(device), wd, b.to(device),
                                              pos_interp="none", **kwd)
                out.float().square().sum().backward()
                _close(out.detach(), ref.detach(), f"patch_embed implicit {px.dtype}")
                _close(wd.grad, w_ref.grad, f"patch_embed implicit dW {px.dtype}")
                n += 1
            # packed Qwen3-VL rows: one GEMM, the positions + bias in its epilogue (92 rows,
            # D = 136: partial tiles; K = 96: half a k tile)
            grid = torch.tensor([[1, 4, 6], [2, 8, 4], [1, 2, 2]])
            rows = torch.randn(92, 3 * 2 * 4 * 4).to(torch.bfloat16)
            w3 = (torch.randn(136, 3, 2, 4, 4) * 0.1).to(torch.bfloat16)
            table = torch.randn(36, 136).to(torch.bfloat16)
            ref, _ = vlmkern.reference.patch_embed(rows, w3, b, pos_embed=table, grid_thw=grid,
                                                   spatial_merge_size=2)
            out, _ = vlmkern.ops.patch_embed(rows.to(device), w3.to(device), b.to(device),
                                             pos_embed=table.to(device),
                                             grid_thw=grid.to(device), spatial_merge_size=2)
            _close(out, ref, "patch_embed implicit packed positions")
            n += 1
    return n


# op name (as in vlmkern.info()["ops"]) -> smoke function; an op missing here fails the run.
def smoke_gated_linear(device: str) -> int:
    """gated_linear forward + backward: the fused cuBLASLt GEMM (odd K, strided residual, bias,
    3-D x) and its scalar kernel, against the float64 reference."""
    n = 0
    for dtype in DTYPES:
        for lead, k, n_out, bias in (((2, 9), 64, 48, False), ((17,), 33, 40, True)):
            x = torch.randn(*lead, k).to(dtype)
            w = (torch.randn(n_out, k) / k**0.5).to(dtype)
            gate = torch.tensor([0.6]).to(dtype)
            r = torch.randn(*lead, n_out + 3).to(dtype)[..., :n_out]
            b = torch.randn(n_out).to(dtype) if bias else None
            args = [x, w, gate, r, b]
            ref = vlmkern.reference.gated_linear(
                *[None if t is None else t.double() for t in args])
            dev = [None if t is None else t.to(device).requires_grad_() for t in args]
            out = vlmkern.ops.gated_linear(*dev)
            _close(out.detach(), ref, f"gated_linear {lead} K={k} bias={bias} {dtype}")
            out.float().square().sum().backward()
            assert all(torch.isfinite(t.grad).all() for t in dev if t is not None)
            n += 1
    return n


CASES: dict[str, Callable[[str], int]] = {
    "pixel_shuffle": smoke_pixel_shuffle,
    "pixel_unshuffle": smoke_pixel_shuffle,
    "rope": smoke_rope,
    "rope_": smoke_rope,
    "rope_backward": smoke_rope,
    "rope_cos_sin": smoke_rope,
    "rope_cos_sin_backward": smoke_rope,
    "mrope_position_ids": run_mrope_smoke,
    "mlp_projector": smoke_mlp_projector,
    "mlp_projector_backward": smoke_mlp_projector,
    "cross_attention": smoke_cross_attention,
    "cross_attention_backward": smoke_cross_attention,
    "mllama_kv_ranges": smoke_cross_attention,
    "gated_linear": smoke_gated_linear,
    "gated_linear_backward": smoke_gated_linear,
    "patch_embed": smoke_patch_embed,
    "patch_embed_backward": smoke_patch_embed,
    "patch_embed_packed": smoke_patch_embed,
    "patch_embed_packed_backward": smoke_patch_embed,
    "patch_embed_varlen": smoke_patch_embed,
    "patch_embed_varlen_backward": smoke_patch_embed,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitizer_smoke: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)

    missing = sorted(set(vlmkern.info()["ops"]) - set(CASES))
    if missing:
        print(f"sanitizer_smoke: no smoke cases for op(s) {missing}; add them to CASES",
              file=sys.stderr)
        return 1
    n = sum(fn(args.device) for fn in dict.fromkeys(CASES.values()))  # each function once
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitizer_smoke: {n} cases match the reference on {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
