"""Small smoke run of every vlmkern op, forward (and backward where it has one), checked against
vlmkern.reference; run under compute-sanitizer by bench/gpu_check.sh (TESTING.md G10). Usage:
python3 sanitizer_smoke.py [--device cuda|cpu]. Inputs are made on the CPU and copied over so that,
besides our kernels, the GPU runs little more than the copies autograd needs; comparisons happen
on the CPU."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

import vlmkern
import vlmkern.ops
import vlmkern.reference

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


# op name (as in vlmkern.info()["ops"]) -> cases; an op missing here fails the smoke run.
CASES: dict[str, Callable[[], list[tuple]]] = {
    "pixel_shuffle": pixel_shuffle_cases,
    "pixel_unshuffle": pixel_shuffle_cases,
}


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


# ops checked by their own runner (device -> number of cases run).
RUNNERS: dict[str, Callable[[str], int]] = {"mrope_position_ids": run_mrope_smoke}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitizer_smoke: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)

    missing = sorted(set(vlmkern.info()["ops"]) - set(CASES) - set(RUNNERS))
    if missing:
        print(f"sanitizer_smoke: no smoke cases for op(s) {missing}; add them to CASES",
              file=sys.stderr)
        return 1
    seen: set[tuple] = set()
    n = 0
    for make in CASES.values():
        for op, shape, scale in make():
            if (op, shape, scale) in seen:
                continue
            seen.add((op, shape, scale))
            for dtype in DTYPES:
                for layout in LAYOUTS:
                    run_case(op, shape, scale, dtype, layout, args.device)
                    n += 1
            run_case(op, (0, *shape[1:]), scale, torch.float32, "contiguous", args.device)
            n += 1
    for run in RUNNERS.values():
        n += run(args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitizer_smoke: {n} cases match the reference on {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
