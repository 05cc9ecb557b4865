"""Public functional ops. Each module registers fake (meta) kernels and autograd for its ops."""

from .pixel_shuffle import pixel_shuffle, pixel_unshuffle
from .rope import (
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_vision,
    mrope,
    mrope_,
    rope,
    vision_rope,
)

__all__ = [
    "apply_rotary_pos_emb",
    "apply_rotary_pos_emb_vision",
    "mrope",
    "mrope_",
    "pixel_shuffle",
    "pixel_unshuffle",
    "rope",
    "vision_rope",
]
