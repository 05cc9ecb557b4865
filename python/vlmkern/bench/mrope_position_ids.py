"""M-RoPE position-id bench: vlmkern vs HF's get_rope_index (the transformers 5.x per-row Python
loop, host syncs per image) on left-padded Qwen-style batches of multi-image rows and videos."""

from __future__ import annotations

import functools
import random
import types
from collections.abc import Callable

import torch

from vlmkern.bench.harness import Case, Config

NAME = "mrope_position_ids"
BASELINE = "hf"
EXACT = True  # integer positions: every provider must match the reference bit for bit

IMAGE_ID, VIDEO_ID, VISION_START, VISION_END, PAD_ID = 151655, 151656, 151652, 151653, 151643


def make_batch(rows, model: str, device: str, seed: int) -> tuple:
    """(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask), left padded.
    rows: per row a list of segments -- n (text tokens) or ("image" | "video", t, h, w) in patches;
    every block sits between vision_start / vision_end, Qwen3-VL frames between timestamp text."""
    gen = torch.Generator().manual_seed(seed)
    seqs, images, videos = [], [], []

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, 150000, (n,), generator=gen)

    def block(token: int, n: int) -> list[torch.Tensor]:
        return [torch.tensor([VISION_START]), torch.full((n,), token), torch.tensor([VISION_END])]

    for segments in rows:
        parts = []
        for seg in segments:
            if isinstance(seg, int):
                parts.append(text(seg))
                continue
            kind, t, h, w = seg
            per_frame = (h // 2) * (w // 2)
            (images if kind == "image" else videos).append((t, h, w))
            if kind == "image":
                parts += block(IMAGE_ID, t * per_frame)
            elif model == "qwen3_vl":
                for _ in range(t):
                    parts += [text(3), *block(VIDEO_ID, per_frame)]
            else:
                parts += block(VIDEO_ID, t * per_frame)
        seqs.append(torch.cat(parts))
    seq = max(len(s) for s in seqs)
    input_ids = torch.full((len(rows), seq), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((len(rows), seq), dtype=torch.int64)
    for b, s in enumerate(seqs):
        input_ids[b, seq - len(s) :] = s
        mask[b, seq - len(s) :] = 1
    types_ = (input_ids == IMAGE_ID).long() + 2 * (input_ids == VIDEO_ID).long()

    def grid(g):
        return torch.tensor(g, dtype=torch.int64, device=device).view(-1, 3) if g else None

    return (input_ids.to(device), types_.to(device), grid(images), grid(videos), mask.to(device))


def _rows(batch: int, images: int, videos: int, seed: int, frames: int = 8) -> list:
    """Rows of `images` images (grids 16..46 patches a side, 64..529 tokens each) and `videos`
    videos (frames x 16..32 patches), text of 2..40 tokens between blocks; lengths differ."""
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        segs: list = [rng.randint(10, 40)]
        for _ in range(images):
            side = 2 * rng.randint(8, 23), 2 * rng.randint(8, 23)
            segs += [("image", 1, *side), rng.randint(2, 40)]
        for _ in range(videos):
            segs += [("video", frames, 2 * rng.randint(8, 16), 2 * rng.randint(8, 16)),
                     rng.randint(2, 40)]
        rows.append(segs)
    return rows


def _case(label: str, batch: int, images: int, videos: int, model: str, cfg: Config) -> Case:
    rows = _rows(batch, images, videos, seed=batch * 100 + images * 10 + videos)
    probe = make_batch(rows, model, "cpu", 0)
    kwargs: dict = {"model": model}
    if model == "qwen2_5_vl" and videos:
        # 1.0 s per grid (temporal patch 2 at the processor's default 2 fps): transformers <= 5.17
        # truncates fractional values to int and later releases do not, so keep it integral.
        kwargs["second_per_grid_ts"] = torch.full((batch * videos,), 1.0, device=cfg.device)
    counter = iter(range(1 << 30))

    def make() -> tuple:  # same rows (same grids), fresh text and device buffers
        return make_batch(rows, model, cfg.device, next(counter))

    b, s = probe[0].shape
    grids = sum(g.numel() for g in probe[2:4] if g is not None)
    # mm_token_type_ids + attention_mask read, grids read, (3, B, S) + (B, 1) int64 written.
    bytes_moved = 8 * (2 * b * s + grids + 3 * b * s + b)
    shape = f"{label} B{b} S{s}"
    return Case(shape, make, bytes_moved=bytes_moved, kwargs=kwargs)


def cases(cfg: Config) -> list[Case]:
    """Qwen2-VL image batches from one image to 16 rows x 8 images; Qwen2.5-VL and Qwen3-VL
    videos (8 merged frames, Qwen3-VL split per frame)."""
    quick = [_case("qwen2_vl 1 img", 1, 1, 0, "qwen2_vl", cfg),
             _case("qwen2_vl 8 img/row", 16, 8, 0, "qwen2_vl", cfg)]
    if cfg.quick:
        return quick
    return quick[:1] + [
        _case("qwen2_vl 2 img/row", 4, 2, 0, "qwen2_vl", cfg),
        quick[1],
        _case("qwen2_5_vl 1 vid + 2 img", 8, 2, 1, "qwen2_5_vl", cfg),
        _case("qwen3_vl 1 vid + 2 img", 8, 2, 1, "qwen3_vl", cfg),
    ]


@functools.lru_cache(maxsize=None)
def _hf_method(model: str) -> Callable:
    """HF's own ``<Model>.get_rope_index`` on a weightless object holding a real config."""
    import importlib

    import transformers

    cls_name = {"qwen2_vl": "Qwen2VLModel", "qwen2_5_vl": "Qwen2_5_VLModel",
                "qwen3_vl": "Qwen3VLModel"}[model]  # fmt: skip
    cfg_name = {"qwen2_vl": "Qwen2VLConfig", "qwen2_5_vl": "Qwen2_5_VLConfig",
                "qwen3_vl": "Qwen3VLConfig"}[model]  # fmt: skip
    module = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
    cls = getattr(module, cls_name)
    vision = {"spatial_merge_size": 2}
    if model == "qwen2_5_vl":
        vision["tokens_per_second"] = 2
    shim = types.SimpleNamespace(config=getattr(transformers, cfg_name)(vision_config=vision))
    shim.get_vision_position_ids = types.MethodType(cls.get_vision_position_ids, shim)
    return types.MethodType(cls.get_rope_index, shim)


def hf_get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                      attention_mask, model: str = "qwen2_vl", second_per_grid_ts=None):
    extra = {"second_per_grid_ts": second_per_grid_ts} if model == "qwen2_5_vl" else {}
    return _hf_method(model)(input_ids, mm_token_type_ids=mm_token_type_ids,
                             image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                             attention_mask=attention_mask, **extra)


def providers(cfg: Config) -> dict[str, Callable]:
    import vlmkern.ops

    return {"vlmkern": vlmkern.ops.mrope_position_ids, "hf": hf_get_rope_index}


def reference() -> Callable:
    import vlmkern.reference

    return vlmkern.reference.mrope_position_ids
