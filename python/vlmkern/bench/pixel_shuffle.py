"""Pixel-shuffle bench: vlmkern vs the two-copy view/permute/contiguous recipe (eager and
torch.compile) on InternVL and SmolVLM tile shapes, against the copy roofline."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlmkern.bench.harness import Case, Config

NAME = "pixel_shuffle"
BASELINE = "torch"
EXACT = True  # pure data movement: every provider must be bit-identical to the reference


def torch_recipe(
    x: torch.Tensor, scale: int, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """InternVL's `pixel_shuffle` (HF InternVLModel), two full copies, for integer factor r.

    x: (B, H, W, C), or (B, N, C) with grid=(H, W); returns (B, H/r, W/r, r*r*C) or
    (B, N/(r*r), r*r*C) in x's dtype.
    """
    flat = x.dim() == 3
    if flat:
        x = x.reshape(x.shape[0], grid[0], grid[1], x.shape[-1])  # a view, also for [:, 1:]
    b, h, w, c = x.shape
    x = x.view(b, h, w // scale, c * scale)
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(b, w // scale, h // scale, c * scale * scale)
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(b, -1, x.shape[-1]) if flat else x


def _case(label: str, batch: int, grid: int, chans: int, r: int, layout: str,
          cfg: Config) -> Case:
    elt = torch.empty((), dtype=cfg.dtype).element_size()
    n = grid * grid
    dev, dt = cfg.device, cfg.dtype

    if layout == "cls":  # ViT output with the CLS token dropped: strided batch dimension
        shape = f"{label} ({batch},{n + 1},{chans})[:,1:] r{r}"

        def make() -> tuple:
            return (torch.randn(batch, n + 1, chans, device=dev, dtype=dt)[:, 1:],)

        kwargs = {"scale": r, "grid": (grid, grid)}
    elif layout == "flat":  # (B, N, C) contiguous, e.g. SigLIP output (no CLS)
        shape = f"{label} ({batch},{n},{chans}) r{r}"

        def make() -> tuple:
            return (torch.randn(batch, n, chans, device=dev, dtype=dt),)

        kwargs = {"scale": r, "grid": (grid, grid)}
    else:  # contiguous 4-D
        shape = f"{label} ({batch},{grid},{grid},{chans}) r{r}"

        def make() -> tuple:
            return (torch.randn(batch, grid, grid, chans, device=dev, dtype=dt),)

        kwargs = {"scale": r}
    return Case(shape, make, bytes_moved=2 * batch * n * chans * elt, kwargs=kwargs)


def cases(cfg: Config) -> list[Case]:
    """InternVL 32x32x1024 r=2 tiles (CLS-dropped strided input; contiguous 4-D at B=12) and
    SmolVLM 32x32x768 r=4."""
    if cfg.quick:  # one of each path: strided 3-D, contiguous 4-D, r=4
        return [_case("internvl", 1, 32, 1024, 2, "cls", cfg),
                _case("internvl", 12, 32, 1024, 2, "4d", cfg),
                _case("smolvlm", 8, 32, 768, 4, "flat", cfg)]
    out = [_case("internvl", b, 32, 1024, 2, "cls", cfg) for b in (1, 2, 4, 8, 12)]
    out.append(_case("internvl", 12, 32, 1024, 2, "4d", cfg))
    out += [_case("smolvlm", b, 32, 768, 4, "flat", cfg) for b in (1, 8)]
    return out


class _Compiled:
    """torch.compile of the recipe, recompiled per case (dynamo reset on each new shape) so
    every shape gets its own static-shape kernel instead of an automatic-dynamic one."""

    def __init__(self) -> None:
        self._key = None
        self._fn: Callable | None = None

    def __call__(self, x: torch.Tensor, scale: int, grid=None) -> torch.Tensor:
        key = (tuple(x.shape), x.stride(), x.dtype, x.device, scale, grid)
        if key != self._key:
            torch._dynamo.reset()
            self._fn = torch.compile(torch_recipe, dynamic=False)
            self._key = key
        return self._fn(x, scale, grid)


def providers(cfg: Config) -> dict[str, Callable]:
    import vlmkern.ops

    out: dict[str, Callable] = {
        "vlmkern": vlmkern.ops.pixel_shuffle,
        "torch": torch_recipe,
    }
    if cfg.compile:
        out["torch.compile"] = _Compiled()
    return out


def reference() -> Callable:
    import vlmkern.reference

    return vlmkern.reference.pixel_shuffle
