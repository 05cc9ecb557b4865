"""M-RoPE position ids (Qwen2-VL / Qwen2.5-VL / Qwen3-VL ``get_rope_index``) computed by one
device op: public wrapper and fake kernel for ``torch.ops.vlmkern.mrope_position_ids``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

MODELS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TEXT_AFTER_VIDEO = ("hf", "max_plus_one")
# Qwen2-VL / 2.5-VL / 3-VL checkpoints all use these (config.image_token_id / video_token_id).
QWEN_IMAGE_TOKEN_ID = 151655
QWEN_VIDEO_TOKEN_ID = 151656
_OP = "vlmkern.mrope_position_ids"


def mrope_position_ids(
    input_ids: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    model: str = "qwen2_vl",
    spatial_merge_size: int = 2,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    tokens_per_second: int | float = 2,
    text_after_video: str = "hf",
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D (temporal, height, width) RoPE positions of a text + image + video batch.

    Bit-identical to ``Qwen2VLModel`` / ``Qwen2_5_VLModel`` / ``Qwen3VLModel.get_rope_index`` of
    transformers 5.17-5.23, in one op: no host sync, CUDA-graph capturable, ``torch.compile``-able.

    Per row (after dropping ``attention_mask == 0`` tokens): text tokens count up by one; each run
    of image (video) tokens is one block that takes the next row of ``image_grid_thw``
    (``video_grid_thw``) -- rows consume the grids in order. A block of grid ``(t, h, w)`` with
    merge ``m`` holds ``t·(h/m)·(w/m)`` tokens in (t, h/m, w/m) order at
    ``(start + ⌊i_t·interval⌋, start + i_h, start + i_w)``; text after it continues at
    ``start + max(h/m, w/m)`` (``text_after_video="hf"``, transformers 5.x) or at the block's
    largest position + 1 (``"max_plus_one"``: transformers 5.0 and older, vLLM, the Qwen reference
    code). The two rules differ only for blocks with ``t > 1`` (videos), hence the name.

    Args:
        input_ids: ``(B, S)`` int64/int32 token ids; used to find image / video tokens
            (``image_token_id``, ``video_token_id``) when ``mm_token_type_ids`` is None.
        mm_token_type_ids: ``(B, S)`` int64/int32, 0 text, 1 image, 2 video (what the 5.x
            processors return); takes precedence over ``input_ids``. Any other value counts as
            text (HF would raise).
        image_grid_thw: ``(Ni, 3)`` int64/int32 ``(t, h, w)`` patch grids, in order of appearance.
        video_grid_thw: ``(Nv, 3)`` int64/int32.
        attention_mask: ``(B, S)`` bool or integer; nonzero = real token. Left, right or holes.
        model: ``"qwen2_vl"`` (default), ``"qwen2_5_vl"`` (videos use ``interval =
            tokens_per_second · second_per_grid_ts[v]``) or ``"qwen3_vl"`` (every video frame is
            its own ``(1, h, w)`` block, as its processor puts timestamps between frames). Images
            are placed the same way by all three.
        spatial_merge_size: ``m ≥ 1`` (``config.vision_config.spatial_merge_size``, 2 in Qwen).
        image_token_id, video_token_id: token ids for the ``input_ids`` path; default to the Qwen
            checkpoints' 151655 / 151656.
        second_per_grid_ts: ``(Nv,)`` tensor (float32/float64/int) or sequence of numbers,
            ``qwen2_5_vl`` only; None means 1 for every video, like HF. The temporal offset is
            ``(arange(t) · interval).long()`` computed in the interval's dtype, exactly as HF 5.23
            does (HF ≤ 5.17 truncated ``second_per_grid_ts`` to int first: pass
            ``second_per_grid_ts.long()`` to reproduce that).
        tokens_per_second: ``config.vision_config.tokens_per_second`` (2 in the released
            Qwen2.5-VL checkpoints; the HF config class defaults to 4).
        text_after_video: ``"hf"`` (default: bit-identical to transformers 5.x) or
            ``"max_plus_one"``.

    Returns:
        ``position_ids`` ``(3, B, S)`` int64 -- padding positions are 0, as HF leaves them -- and
        ``rope_deltas`` ``(B, 1)`` int64 = ``max position + 1 − number of real tokens`` (0 for a
        row without real tokens, where HF raises). Always int64, on the tokens' device.

    Errors:
        Shapes, dtypes, devices and flags are checked on every device (``RuntimeError`` naming
        the argument; ``ValueError`` for wrapper arguments). Data-dependent inconsistencies --
        more blocks than grid rows, a block whose length is not ``t·(h/m)·(w/m)``, a negative
        grid entry, a non-finite interval -- raise on the CPU; on CUDA they cannot without a host
        sync, so every position of each such row is set to -1 and its rope_delta to 0 (rows after
        it may then use the wrong grids). Fewer blocks than grid rows is not an error (HF
        ignores the extra rows too).
    """
    if model not in MODELS:
        raise ValueError(f"{_OP}: model must be one of {MODELS}, got {model!r}")
    if text_after_video not in TEXT_AFTER_VIDEO:
        raise ValueError(
            f"{_OP}: text_after_video must be one of {TEXT_AFTER_VIDEO}, got {text_after_video!r}"
        )
    if mm_token_type_ids is not None:
        tokens, image_token, video_token = mm_token_type_ids, 1, 2
    elif input_ids is not None:
        tokens = input_ids
        image_token = QWEN_IMAGE_TOKEN_ID if image_token_id is None else image_token_id
        video_token = QWEN_VIDEO_TOKEN_ID if video_token_id is None else video_token_id
    else:
        raise ValueError(f"{_OP}: pass mm_token_type_ids or input_ids")
    if second_per_grid_ts is not None and model != "qwen2_5_vl":
        raise ValueError(f"{_OP}: second_per_grid_ts is only used with model='qwen2_5_vl'")
    intervals = None
    if model == "qwen2_5_vl" and video_grid_thw is not None:
        intervals = _video_intervals(
            second_per_grid_ts, tokens_per_second, video_grid_thw.shape[0], tokens.device
        )
    return torch.ops.vlmkern.mrope_position_ids(
        tokens,
        attention_mask,
        image_grid_thw,
        video_grid_thw,
        intervals,
        spatial_merge_size,
        image_token,
        video_token,
        model == "qwen3_vl",
        text_after_video,
    )


def _video_intervals(
    second_per_grid_ts: torch.Tensor | Sequence[float] | None,
    tokens_per_second: int | float,
    num_videos: int,
    device: torch.device,
) -> torch.Tensor:
    """Per-video ``tokens_per_second · second_per_grid_t`` in the dtype HF's product has: float32
    for float32 (or Python float) factors, float64 for float64, and exact (as float64) for ints."""
    if isinstance(tokens_per_second, bool) or not isinstance(tokens_per_second, (int, float)):
        raise ValueError(f"{_OP}: tokens_per_second must be a number, got {tokens_per_second!r}")
    if second_per_grid_ts is None:  # HF: tokens_per_second * 1 per video
        dtype = torch.float64 if isinstance(tokens_per_second, int) else torch.float32
        return torch.full((num_videos,), tokens_per_second, dtype=dtype, device=device)
    if isinstance(second_per_grid_ts, torch.Tensor):
        if second_per_grid_ts.dtype in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"{_OP}: second_per_grid_ts must be float32, float64 or an integer dtype, got "
                f"{second_per_grid_ts.dtype}"
            )
        product = tokens_per_second * second_per_grid_ts
        return product if product.is_floating_point() else product.double()
    values = [tokens_per_second * s for s in second_per_grid_ts]  # Python numbers, as HF's loop
    exact = all(isinstance(v, int) for v in values)
    return torch.tensor(values, dtype=torch.float64 if exact else torch.float32, device=device)


# ---- fake (meta) kernel: the same checks and messages as csrc/common/mrope_position_ids.cpp -----

_INTS = (torch.int32, torch.int64)


def _check_device(t: torch.Tensor, tokens: torch.Tensor, name: str) -> None:
    torch._check(
        t.device == tokens.device,
        lambda: f"{_OP}: {name} is on {t.device} but tokens is on {tokens.device}",
    )


def _check_grid(grid: torch.Tensor | None, tokens: torch.Tensor, name: str) -> None:
    if grid is None:
        return
    torch._check(
        grid.dim() == 2 and grid.shape[1] == 3,
        lambda: f"{_OP}: {name} must be a 2-D tensor (N, 3) of (t, h, w) rows, got shape "
        f"{list(grid.shape)}",
    )
    torch._check(
        grid.dtype in _INTS, lambda: f"{_OP}: {name} must be int64 or int32, got {grid.dtype}"
    )
    _check_device(grid, tokens, name)


@torch.library.register_fake("vlmkern::mrope_position_ids")
def _mrope_position_ids_fake(
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    video_intervals: torch.Tensor | None,
    spatial_merge_size: int,
    image_token: int,
    video_token: int,
    split_video_frames: bool,
    text_after_video: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(
        tokens.dim() == 2,
        lambda: f"{_OP}: tokens must be a 2-D tensor (B, S) of mm_token_type_ids or input_ids, "
        f"got {tokens.dim()}-D of shape {list(tokens.shape)}",
    )
    torch._check(
        tokens.dtype in _INTS,
        lambda: f"{_OP}: tokens (mm_token_type_ids or input_ids) must be int64 or int32, got "
        f"{tokens.dtype}",
    )
    if attention_mask is not None:
        mask = attention_mask
        torch._check(
            mask.shape == tokens.shape,
            lambda: f"{_OP}: attention_mask must have the shape of tokens {list(tokens.shape)}, "
            f"got {list(mask.shape)}",
        )
        torch._check(
            mask.dtype == torch.bool
            or (not mask.dtype.is_floating_point and not mask.dtype.is_complex),
            lambda: f"{_OP}: attention_mask must be bool or an integer dtype, got {mask.dtype}",
        )
        _check_device(mask, tokens, "attention_mask")
    _check_grid(image_grid_thw, tokens, "image_grid_thw")
    _check_grid(video_grid_thw, tokens, "video_grid_thw")
    if video_intervals is not None:
        iv = video_intervals
        torch._check(
            video_grid_thw is not None,
            lambda: f"{_OP}: video_intervals is given but video_grid_thw is None",
        )
        torch._check(
            not split_video_frames,
            lambda: f"{_OP}: video_intervals must be None with split_video_frames=True (every "
            "frame has t = 1)",
        )
        nv = video_grid_thw.shape[0]
        torch._check(
            iv.dim() == 1 and iv.shape[0] == nv,
            lambda: f"{_OP}: video_intervals must have shape (Nv,) = ({nv},), one per "
            f"video_grid_thw row, got {list(iv.shape)}",
        )
        torch._check(
            iv.dtype in (torch.float32, torch.float64),
            lambda: f"{_OP}: video_intervals must be float32 or float64, got {iv.dtype}",
        )
        _check_device(iv, tokens, "video_intervals")
    torch._check(
        spatial_merge_size >= 1,
        lambda: f"{_OP}: spatial_merge_size must be >= 1, got {spatial_merge_size}",
    )
    torch._check(
        image_token != video_token,
        lambda: f"{_OP}: image_token and video_token must differ, got {image_token} for both",
    )
    torch._check(
        text_after_video in TEXT_AFTER_VIDEO,
        lambda: f'{_OP}: text_after_video must be "hf" or "max_plus_one", got '
        f'"{text_after_video}"',
    )
    batch, seq = tokens.shape
    position_ids = tokens.new_empty((3, batch, seq), dtype=torch.int64)
    rope_deltas = tokens.new_empty((batch, 1), dtype=torch.int64)
    return position_ids, rope_deltas
