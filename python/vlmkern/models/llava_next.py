"""LLaVA-NeXT (LLaVA-1.6) and LLaVA-OneVision from vlmkern pieces: LLaVA-1.5's tower and projector
run on every any-res tile at once, then each image's tile grid is unpadded to its aspect ratio and
packed with ``image_newline`` rows, as HF's ``LlavaNext`` / ``LlavaOnevision`` models do."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.projector import LlavaMultiModalProjector
from ._common import copy_of, hf_parts
from .llava import Llava, vision_tower_from_hf

_MODEL_TYPES = ("llava_next", "llava_onevision")
_ONEVISION_INPUTS = ("batch_num_images", "pixel_values_videos")


def best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]
                    ) -> tuple[int, int]:
    """The (height, width) of ``pinpoints`` an image of ``height`` x ``width`` pixels is tiled at
    (HF's ``select_best_resolution``): the most of the image's pixels kept once scaled to fit,
    then the least padding; the first such pinpoint."""
    best, kept_best, waste_best = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - kept
        if kept > kept_best or (kept == kept_best and waste < waste_best):
            best, kept_best, waste_best = (h, w), kept, waste
    return best


def unpad_box(rows: int, cols: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the part of a ``rows`` x ``cols`` feature grid covered by an
    image of ``height`` x ``width`` pixels that was scaled to fit it and padded equally on both
    sides (HF's ``unpad_image``, with its float rounding)."""
    if width / height > cols / rows:  # wider than the grid: padding above and below
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        return pad, rows - pad, 0, cols
    kept = int(round(width * (rows / height), 7))
    pad = (cols - kept) // 2
    return 0, rows, pad, cols - pad


def _ints(values: Any) -> Any:
    """Tensors (and arrays) as Python numbers / nested lists (a host read), sequences as lists of
    the same; numbers as plain ``int`` / ``float`` (under torch.compile a size that changed
    between calls comes as a symbolic int: made a constant, so each size recompiles)."""
    if isinstance(values, bool):
        return values
    if isinstance(values, int):
        return int(values)
    if isinstance(values, float):
        return float(values)
    if hasattr(values, "tolist"):
        return values.tolist()
    if isinstance(values, (list, tuple)):
        return [_ints(v) for v in values]
    return values


class LlavaNext(Llava):
    """LLaVA-NeXT / LLaVA-OneVision (``model_type``): :class:`Llava`'s tower, feature layers,
    select strategy and projector on each 'any-res' tile, then HF's 'spatial_unpad' packing.

    Inputs as HF's processors give them: ``pixel_values`` (N_images, N_tiles_max, C, S, S) (each
    image's base tile, the whole image at the tower's size S, then its grid of tiles in row-major
    order; the tiles past an image's count are padding and dropped) or the tiles already
    stacked, (Σ n_tiles, C, S, S); ``image_sizes`` (N_images, 2) int, each image's original
    (height, width). An image's grid is that of the best of ``image_grid_pinpoints`` for its
    size (``best_resolution``), gh x gw tiles of s x s patch features (s = S / patch size). Its
    features, for as many ``image_token_id`` placeholders: the base tile's s² rows, then the
    grid's (gh s) x (gw s) features cropped to the image's aspect ratio (``unpad_box``), each row
    followed by ``image_newline`` (D,). OneVision (``vision_aspect_ratio`` 'anyres_max_N') then
    bilinearly shrinks a cropped grid of r x c features to ⌊r / k⌋ x ⌊c / k⌋ when
    k = sqrt(r c / (N s²)) > 1.1, before the newlines. OneVision also takes
    ``batch_num_images`` (B,) (rows with several images use their base tile only, then one
    ``image_newline`` row) and ``pixel_values_videos`` (B, F, C, S, S): each frame's features
    pooled bilinearly to ceil(s/2) x ceil(s/2), a video's frames in order then one
    ``image_newline`` row, for its ``video_token_id`` placeholders.

    Host reads: tile counts, grids and crops are Python ints in HF's math and set the features'
    shapes, so ``image_sizes`` and ``batch_num_images`` given as tensors are read on the host
    (``tolist``: a sync for device tensors). Given as Python lists (the processor's CPU tensors'
    ``tolist()``) nothing is read: the prefill is then one graph under ``torch.compile``,
    specialized on those sizes (each new set of sizes compiles again, up to torch's recompile
    limit, past which it runs eagerly). Videos need neither.

    ``image_newline`` (D,) is copied into a parameter; S and s come from
    ``vision_tower.config``; ``vision_aspect_ratio`` and ``video_token_id`` are OneVision's
    (``model_type`` 'llava_onevision'). ``forward(input_ids, pixel_values=None,
    image_sizes=None, ...)``: see :meth:`VisionLanguageModel.forward`."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, language_model: nn.Module,
                 lm_head: nn.Module, image_newline: torch.Tensor, *, image_token_id: int,
                 image_grid_pinpoints: Sequence[Sequence[int]],
                 feature_layer: int | Sequence[int] = -2, select_strategy: str = "default",
                 model_type: str = "llava_next", vision_aspect_ratio: str = "anyres_max_9",
                 video_token_id: int | None = None) -> None:
        super().__init__(vision_tower, projector, language_model, lm_head,
                         image_token_id=image_token_id, feature_layer=feature_layer,
                         select_strategy=select_strategy)
        name = "vlmkern.models.LlavaNext"
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"{name}: model_type must be one of {_MODEL_TYPES}, got "
                             f"{model_type!r}")
        self.model_type = model_type
        self.tile_size = int(vision_tower.config.image_size)  # S, pixels
        self.side = self.tile_size // int(vision_tower.config.patch_size)  # s, features
        pinpoints = [tuple(p) for p in image_grid_pinpoints
                     if isinstance(p, (list, tuple)) and len(p) == 2
                     and all(isinstance(v, int) and v > 0 and not v % self.tile_size for v in p)]
        if not pinpoints or len(pinpoints) != len(image_grid_pinpoints):
            raise ValueError(f"{name}: image_grid_pinpoints must be (height, width) pairs of "
                             f"positive multiples of the tower's image size {self.tile_size}, "
                             f"got {image_grid_pinpoints!r}")
        self.image_grid_pinpoints = pinpoints
        self.max_area = None  # OneVision's N in anyres_max_N, in tiles
        if model_type == "llava_onevision":
            match = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio)
            if match is None or int(match[1]) < 1:
                raise ValueError(f"{name}: vision_aspect_ratio must be 'anyres_max_N' (N >= 1), "
                                 f"got {vision_aspect_ratio!r}")
            self.max_area = int(match[1])
        elif video_token_id is not None:
            raise ValueError(f"{name}: video_token_id is LLaVA-OneVision's; model_type is "
                             f"{model_type!r}")
        self.video_token_id = video_token_id
        self.image_newline = nn.Parameter(image_newline.detach().clone(),
                                          requires_grad=image_newline.requires_grad)

    @classmethod
    def from_hf(cls, model: nn.Module, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, rescale: float = 1.0) -> LlavaNext:
        """From a ``LlavaNextForConditionalGeneration`` or a
        ``LlavaOnevisionForConditionalGeneration``: vlmkern's tower and projector and
        ``image_newline`` hold copies of HF's weights; the language model and LM head are HF's
        modules themselves (shared). ``mean`` / ``std`` / ``rescale``: the image processor's
        normalization, folded into the patch embedding; the model then takes raw pixels (uint8,
        or floats of the same values). Without them it takes normalized float pixels, as HF."""
        config, inner = hf_parts("LlavaNext", model)
        if config.model_type not in _MODEL_TYPES:
            raise NotImplementedError(f"vlmkern.models.LlavaNext: only model_type 'llava_next' "
                                      f"or 'llava_onevision', got {config.model_type!r}")
        onevision = config.model_type == "llava_onevision"
        projector = copy_of(lambda: LlavaMultiModalProjector.from_config(config),
                            inner.multi_modal_projector)
        tower = vision_tower_from_hf(inner.vision_tower, mean=mean, std=std, rescale=rescale)
        extra = (dict(vision_aspect_ratio=config.vision_aspect_ratio,
                      video_token_id=config.video_token_id) if onevision else {})
        return cls(tower, projector, inner.language_model, model.lm_head, inner.image_newline,
                   image_token_id=config.image_token_id,
                   image_grid_pinpoints=config.image_grid_pinpoints,
                   feature_layer=config.vision_feature_layer,
                   select_strategy=config.vision_feature_select_strategy,
                   model_type=config.model_type, **extra)

    def vision_features(self, pixel_values: torch.Tensor | None = None,
                        image_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
                        **extra: Any) -> dict[int, torch.Tensor]:
        """HF's ``get_image_features`` (and OneVision's ``get_video_features``), concatenated:
        {image_token_id: (Σ T_i, D), video_token_id: (B · (F · ceil(s/2)² + 1), D)} in the
        projector's dtype, only the kinds given. ``extra``: OneVision's ``batch_num_images``
        and ``pixel_values_videos``; pixels as :meth:`Llava.vision_features` takes them."""
        allowed = _ONEVISION_INPUTS if self.model_type == "llava_onevision" else ()
        unexpected = sorted(set(extra) - set(allowed))
        if unexpected:
            raise TypeError(f"vlmkern.models.LlavaNext: unexpected inputs {unexpected} (it takes "
                            f"pixel_values, image_sizes{''.join(', ' + a for a in allowed)})")
        out = {}
        if pixel_values is not None and pixel_values.shape[0] > 0:
            out[self.image_token_id] = self._image_features(pixel_values, image_sizes,
                                                            extra.get("batch_num_images"))
        videos = extra.get("pixel_values_videos")
        if videos is not None:
            out[self.video_token_id] = self._video_features(videos)
        return out

    def _tile_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) tiles -> (N, s², D): LLaVA-1.5's path (feature layers, select strategy,
        projector), each tile's features checked to be an s x s grid."""
        feats = super().vision_features(pixel_values=pixels)[self.image_token_id]
        feats = feats.unflatten(0, (pixels.shape[0], -1))  # (N, T, D)
        n, grid = feats.shape[1], self.side**2
        if n != grid:
            hint = ({grid + 1: " (select_strategy 'full' keeps the tower's CLS row)",
                     grid - 1: " (select_strategy 'default' drops a row of a tower without a "
                               "CLS token)"}).get(n, "")
            raise ValueError(f"vlmkern.models.LlavaNext: a tile gives {n} features, not the "
                             f"{self.side} x {self.side} grid of its patches{hint}")
        return feats

    def _image_features(self, pixel_values: torch.Tensor, image_sizes: Any,
                        batch_num_images: Any) -> torch.Tensor:
        """Every image's tiles through the tower in one batch, then each image packed."""
        name = "vlmkern.models.LlavaNext"
        if image_sizes is None:
            raise ValueError(f"{name}: pixel_values given without image_sizes")
        sizes = _ints(image_sizes)  # host read of a tensor: HF's math takes ints
        if (not isinstance(sizes, list) or not sizes
                or not all(isinstance(s, list) and len(s) == 2 for s in sizes)
                or min(min(s) for s in sizes) <= 0):
            raise ValueError(f"{name}: image_sizes must be (N_images, 2) positive (height, "
                             f"width), got {sizes}")
        anyres = [True] * len(sizes)
        if batch_num_images is not None:  # OneVision: rows with several images, base tile only
            counts = _ints(batch_num_images)
            if sum(counts) != len(sizes):
                raise ValueError(f"{name}: batch_num_images {counts} must add up to the number "
                                 f"of images in image_sizes ({len(sizes)})")
            anyres = [n == 1 for n in counts for _ in range(n)]
        grids = [self._grid(h, w) if tiled else (0, 0)
                 for (h, w), tiled in zip(sizes, anyres, strict=True)]
        counts = [gh * gw + 1 for gh, gw in grids]  # tiles per image, the base tile first
        feats = self._tile_features(self._gather_tiles(pixel_values, counts))  # (Σ n, s², D)
        packed = [self._pack(f, grid, size) for f, grid, size
                  in zip(feats.split(counts), grids, sizes, strict=True)]
        return torch.cat(packed)

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of tiles of an image of ``height`` x ``width`` pixels."""
        h, w = best_resolution(height, width, self.image_grid_pinpoints)
        return h // self.tile_size, w // self.tile_size

    def _gather_tiles(self, pixel_values: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(Σ counts, C, S, S): each image's first ``counts[i]`` tiles, padding tiles dropped."""
        name, shape = "vlmkern.models.LlavaNext", tuple(pixel_values.shape)
        if pixel_values.dim() == 4:  # stacked already
            if shape[0] != sum(counts):
                raise ValueError(f"{name}: stacked pixel_values {shape} must hold {sum(counts)} "
                                 f"tiles (the images' tile counts {counts})")
            return pixel_values
        if pixel_values.dim() != 5:
            raise ValueError(f"{name}: pixel_values must be (N_images, N_tiles, C, H, W) or "
                             f"(total tiles, C, H, W), got shape {shape}")
        if shape[0] != len(counts) or shape[1] < max(counts):
            raise ValueError(f"{name}: pixel_values {shape} must hold {len(counts)} images (the "
                             f"rows of image_sizes) of up to {max(counts)} tiles (the images' "
                             f"tile counts {counts})")
        if all(n == shape[1] for n in counts):
            return pixel_values.flatten(0, 1)
        return torch.cat([tiles[:n] for tiles, n in zip(pixel_values, counts, strict=True)])

    def _pack(self, feats: torch.Tensor, grid: tuple[int, int],
              size: Sequence[int]) -> torch.Tensor:
        """One image's tile features (1 + gh·gw, s², D) -> its (T, D) rows: the base tile's, then
        the grid's, unpadded (and OneVision-shrunk), a newline after each row."""
        base, s, d = feats[0], self.side, feats.shape[-1]
        newline = self.image_newline.to(feats.dtype)
        (gh, gw), (height, width) = grid, size
        if not gh:  # base tile only
            return torch.cat([base, newline[None]])
        x = feats[1:].view(gh, gw, s, s, d).permute(0, 2, 1, 3, 4).reshape(gh * s, gw * s, d)
        top, bottom, left, right = unpad_box(gh * s, gw * s, height, width)
        x = x[top:bottom, left:right]  # (rows, cols, D)
        if self.max_area is not None:
            rows, cols = x.shape[:2]
            ratio = math.sqrt(rows * cols / (self.max_area * s * s))
            if ratio > 1.1:
                x = F.interpolate(x.permute(2, 0, 1)[None], [int(rows // ratio),
                                  int(cols // ratio)], mode="bilinear")[0].permute(1, 2, 0)
        x = torch.cat([x, newline.expand(x.shape[0], 1, d)], 1)  # (rows, cols + 1, D)
        return torch.cat([base, x.flatten(0, 1)])

    def _video_features(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, F, C, S, S) -> (B · (F · ceil(s/2)² + 1), D): frames through the tower, each
        frame's s x s features pooled bilinearly, a newline row after each video."""
        name = "vlmkern.models.LlavaNext"
        if self.video_token_id is None:
            raise ValueError(f"{name}: pixel_values_videos given but no video_token_id")
        if videos.dim() != 5:
            raise ValueError(f"{name}: pixel_values_videos must be (B, frames, C, H, W), got "
                             f"shape {tuple(videos.shape)}")
        b, s = videos.shape[0], self.side
        feats = self._tile_features(videos.flatten(0, 1))  # (B·F, s², D)
        x = feats.unflatten(1, (s, s)).permute(0, 3, 1, 2)  # (B·F, D, s, s)
        x = F.interpolate(x, [math.ceil(s / 2)] * 2, mode="bilinear").permute(0, 2, 3, 1)
        x = x.reshape(b, -1, x.shape[-1])  # (B, F · ceil(s/2)², D)
        newline = self.image_newline.to(x.dtype).expand(b, 1, x.shape[-1])
        return torch.cat([x, newline], 1).flatten(0, 1)
