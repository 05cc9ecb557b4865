"""Plain-PyTorch ground truth for every vlmkern op (float64-capable), used by tests and benches."""

from .pixel_shuffle import pixel_shuffle, pixel_unshuffle
from .rope import apply_rotary_pos_emb, mrope, rope, vision_rope

__all__ = [
    "apply_rotary_pos_emb",
    "mrope",
    "pixel_shuffle",
    "pixel_unshuffle",
    "rope",
    "vision_rope",
]
