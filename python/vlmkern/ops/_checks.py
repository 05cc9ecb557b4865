"""Shared checks for fake (meta) kernels, worded as csrc/common/checks.h words them."""

from __future__ import annotations

import torch


def check_rank(t: torch.Tensor, rank: int, op: str, name: str, layout: str) -> None:
    """Mirror of ``check_rank`` in csrc/common/checks.h."""
    torch._check(
        t.dim() == rank,
        lambda: f"vlmkern.{op}: {name} must be a {rank}-D tensor {layout}, got {t.dim()}-D of "
        f"shape {list(t.shape)}",
    )
