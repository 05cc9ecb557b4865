"""Plain-PyTorch patch embedding (normalize, conv2d / conv3d, CLS, resized positions, Qwen3-VL
bilinear table per image in merge order): the float64-capable ground truth for vlmkern.ops."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _normalize(x: torch.Tensor, mean, std, rescale: float, dim: int) -> torch.Tensor:
    """(x · rescale − mean[c]) / std[c] along `dim`, in x's dtype."""
    shape = [1] * x.dim()
    shape[dim] = -1
    m = torch.tensor(mean if mean is not None else [0.0], dtype=x.dtype).view(shape)
    s = torch.tensor(std if std is not None else [1.0], dtype=x.dtype).view(shape)
    return (x * rescale - m.to(x.device)) / s.to(x.device)


def _resize_bicubic(table: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """(S·S, D) square table -> (gh·gw, D), as HF's interpolate_pos_encoding."""
    side = round(table.shape[0] ** 0.5)
    if (side, side) == (gh, gw) or gh * gw == 0:
        return table[: gh * gw]
    img = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(gh, gw), mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(gh * gw, -1)


def qwen3_positions(table: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """Qwen3-VL: per entry (t, h, w), the (S·S, D) table resized bilinearly (align_corners=True)
    to (h, w), rows in spatial-merge-block order, repeated over the t frames."""
    side = round(table.shape[0] ** 0.5)
    img = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    out = []
    for t, h, w in grid_thw.tolist():
        pos = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=True)[0]
        pos = pos.permute(1, 2, 0).reshape(h // merge, merge, w // merge, merge, -1)
        out.append(pos.permute(0, 2, 1, 3, 4).reshape(h * w, -1).repeat(t, 1))
    return torch.cat(out) if out else table.new_zeros((0, table.shape[1]))


def patch_embed(
    pixels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    rescale: float = 1.0,
    channels_last: bool = False,
    pos_interp: str | None = None,
    grid_thw: torch.Tensor | None = None,
    spatial_merge_size: int = 1,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`vlmkern.ops.patch_embed`, computed as normalize-then-embed with
    ``F.conv2d`` / ``F.conv3d`` in ``weight.dtype`` (use float64 for ground truth)."""
    x = pixels.to(weight.dtype)
    if grid_thw is not None:
        d, c, t, p, _ = weight.shape
        x = x.reshape(-1, c, t, p, p)
        if mean is not None or std is not None or rescale != 1.0:
            x = _normalize(x, mean, std, rescale, 1)
        tokens = F.conv3d(x, weight, bias, stride=(t, p, p)).reshape(-1, d)
        if pos_embed is not None:
            tokens = tokens + qwen3_positions(pos_embed, grid_thw.cpu(), spatial_merge_size).to(
                tokens.device
            )
        counts = (grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).long()
        cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        return tokens, cu
    if channels_last:
        x = x.permute(0, 3, 1, 2)
    if mean is not None or std is not None or rescale != 1.0:
        x = _normalize(x, mean, std, rescale, 1)
    p = weight.shape[-1]
    gh, gw = x.shape[2] // p, x.shape[3] // p
    if gh * gw == 0:  # conv2d rejects an input smaller than its kernel
        tokens = x.new_zeros((x.shape[0], 0, weight.shape[0]))
    else:
        tokens = F.conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)
    if pos_embed is not None and pos_embed.dim() == 3:
        pos_embed = pos_embed[0]
    if cls_token is not None:
        cls = cls_token.reshape(1, 1, -1).expand(tokens.shape[0], 1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
    if pos_embed is not None:
        first = 1 if cls_token is not None else 0
        grid = pos_embed[first:]
        if pos_interp != "none":
            grid = _resize_bicubic(grid, gh, gw)
        tokens = tokens + torch.cat([pos_embed[:first], grid])
    return tokens
