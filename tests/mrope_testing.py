"""Test helpers for mrope_position_ids: Qwen-style token batches (vision_start / vision_end around
every block, timestamps between Qwen3-VL video frames, padding) and HF's get_rope_index."""

from __future__ import annotations

import random
import types
from dataclasses import dataclass, field

import torch

IMAGE_ID, VIDEO_ID, VISION_START, VISION_END, PAD_ID = 151655, 151656, 151652, 151653, 151643
MODELS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass
class Batch:
    """Inputs in the form the HF processors return (plus what the op needs)."""

    input_ids: torch.Tensor  # (B, S) int64
    mm_token_type_ids: torch.Tensor  # (B, S) int64: 0 text, 1 image, 2 video
    attention_mask: torch.Tensor | None  # (B, S) int64
    image_grid_thw: torch.Tensor | None  # (Ni, 3) int64
    video_grid_thw: torch.Tensor | None  # (Nv, 3) int64
    second_per_grid_ts: torch.Tensor | None = None  # (Nv,) float32, Qwen2.5-VL
    extra: dict = field(default_factory=dict)

    def kwargs(self, form: str = "types") -> dict:
        """Keyword arguments of vlmkern.ops.mrope_position_ids (and the reference)."""
        out = {
            "image_grid_thw": self.image_grid_thw,
            "video_grid_thw": self.video_grid_thw,
            "attention_mask": self.attention_mask,
        }
        if form == "types":
            out["mm_token_type_ids"] = self.mm_token_type_ids
        else:
            out["input_ids"] = self.input_ids
        return out

    def to(self, device) -> Batch:
        def mv(t):
            return None if t is None else t.to(device)

        return Batch(*(mv(getattr(self, k)) for k in (
            "input_ids", "mm_token_type_ids", "attention_mask", "image_grid_thw",
            "video_grid_thw", "second_per_grid_ts")), extra=self.extra)  # fmt: skip


def _block(kind_id: int, n: int) -> list[int]:
    return [VISION_START] + [kind_id] * n + [VISION_END]


def build_batch(rows, *, model: str = "qwen2_vl", merge: int = 2, pad: str | None = "left",
                holes: int = 0, seed: int = 0) -> Batch:
    """rows: per row a list of segments -- an int n (n text tokens), ("image", t, h, w) or
    ("video", t, h, w) with (h, w) in patches. pad: "left" / "right" with an attention mask, or
    None (rows padded with text, no mask). holes: masked-out tokens inserted at random places."""
    rng = random.Random(seed)
    seqs, images, videos = [], [], []
    for segments in rows:
        ids: list[int] = []
        for seg in segments:
            if isinstance(seg, int):
                ids += [rng.randrange(0, 150000) for _ in range(seg)]
                continue
            kind, t, h, w = seg
            per_frame = (h // merge) * (w // merge)
            if kind == "image":
                images.append((t, h, w))
                ids += _block(IMAGE_ID, t * per_frame)
            elif model == "qwen3_vl":  # "<t sec>" text, then one block per frame
                videos.append((t, h, w))
                for _ in range(t):
                    ids += [rng.randrange(0, 150000) for _ in range(3)]
                    ids += _block(VIDEO_ID, per_frame)
            else:
                videos.append((t, h, w))
                ids += _block(VIDEO_ID, t * per_frame)
        keep = [1] * len(ids)
        for _ in range(holes if ids else 0):
            at = rng.randrange(0, len(ids) + 1)
            ids.insert(at, rng.choice([PAD_ID, IMAGE_ID, VIDEO_ID]))
            keep.insert(at, 0)
        seqs.append((ids, keep))
    seq = max((len(ids) for ids, _ in seqs), default=0)
    input_ids = torch.full((len(rows), seq), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((len(rows), seq), dtype=torch.int64)
    for b, (ids, keep) in enumerate(seqs):
        n = len(ids)
        if pad is None:  # fill with text tokens, no mask
            ids = ids + [rng.randrange(0, 150000) for _ in range(seq - n)]
            keep = keep + [1] * (seq - n)
            n = seq
        lo = seq - n if pad == "left" else 0
        input_ids[b, lo : lo + n] = torch.tensor(ids, dtype=torch.int64)
        mask[b, lo : lo + n] = torch.tensor(keep, dtype=torch.int64)
    types_ = (input_ids == IMAGE_ID).long() + 2 * (input_ids == VIDEO_ID).long()
    use_mask = pad is not None or holes > 0

    def grid(g):
        return torch.tensor(g, dtype=torch.int64).view(-1, 3) if g else None

    return Batch(input_ids, types_, mask if use_mask else None, grid(images), grid(videos))


def random_rows(rng: random.Random, batch: int, max_blocks: int, *, videos: bool = True,
                merge: int = 2, max_side: int = 5, max_t: int = 4, text_only_p: float = 0.2):
    """Random rows of text, images and (optionally) videos; grids in patches (multiples of m)."""
    rows = []
    for _ in range(batch):
        segs = [rng.randint(1, 6)]
        if rng.random() >= text_only_p:
            for _ in range(rng.randint(1, max_blocks)):
                kind = "video" if videos and rng.random() < 0.35 else "image"
                t = rng.randint(1, max_t) if kind == "video" else 1
                h, w = (merge * rng.randint(1, max_side) for _ in range(2))
                segs += [(kind, t, h, w), rng.randint(1, 5)]
        rows.append(segs)
    return rows


_CLASSES = {"qwen2_vl": "Qwen2VLModel", "qwen2_5_vl": "Qwen2_5_VLModel", "qwen3_vl": "Qwen3VLModel"}
_CONFIGS = {"qwen2_vl": "Qwen2VLConfig", "qwen2_5_vl": "Qwen2_5_VLConfig",
            "qwen3_vl": "Qwen3VLConfig"}  # fmt: skip


def hf_get_rope_index(model: str, merge: int = 2, tokens_per_second: int | float = 2):
    """HF's own ``<Model>.get_rope_index`` bound to a weightless object that carries a real config
    (the method only reads ``self.config`` and calls ``self.get_vision_position_ids``)."""
    import importlib

    import transformers

    module = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
    cls = getattr(module, _CLASSES[model])
    vision = {"spatial_merge_size": merge}
    if model == "qwen2_5_vl":
        vision["tokens_per_second"] = tokens_per_second
    config = getattr(transformers, _CONFIGS[model])(vision_config=vision)
    for name in ("get_rope_index", "get_vision_position_ids"):
        if not hasattr(cls, name):  # fail loudly if transformers renamed them
            raise AttributeError(f"transformers {transformers.__version__}: {cls.__name__}.{name}")
    shim = types.SimpleNamespace(config=config)
    shim.get_vision_position_ids = types.MethodType(cls.get_vision_position_ids, shim)
    return types.MethodType(cls.get_rope_index, shim)


def matching_seconds(model: str, second_per_grid_ts):
    """second_per_grid_ts as vlmkern must get it to match the installed transformers: releases up
    to 5.17 truncate each entry to int (``tokens_per_second * int(next(second_per_grid_ts))``),
    later ones keep the fraction; vlmkern follows the later ones unless given ints."""
    import importlib
    import inspect

    if model != "qwen2_5_vl" or second_per_grid_ts is None:
        return second_per_grid_ts
    module = importlib.import_module("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    if "int(next(second_per_grid_ts))" not in inspect.getsource(module.Qwen2_5_VLModel):
        return second_per_grid_ts
    if isinstance(second_per_grid_ts, torch.Tensor):
        return second_per_grid_ts.long()
    return [int(s) for s in second_per_grid_ts]


def hf_call(fn, batch: Batch, model: str, second_per_grid_ts=None):
    kwargs = {
        "mm_token_type_ids": batch.mm_token_type_ids,
        "image_grid_thw": batch.image_grid_thw,
        "video_grid_thw": batch.video_grid_thw,
        "attention_mask": batch.attention_mask,
    }
    if model == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = second_per_grid_ts
    return fn(batch.input_ids, **kwargs)
