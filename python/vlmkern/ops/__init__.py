"""Public functional ops. Each module registers fake (meta) kernels and autograd for its ops."""

from .cross_attention import cross_attention, mllama_kv_ranges
from .gated_linear import gated_linear
from .mlp_projector import mlp_projector
from .mrope_position_ids import mrope_position_ids
from .patch_embed import patch_embed
from .pixel_shuffle import pixel_shuffle, pixel_unshuffle
from .rope import (
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_vision,
    mrope,
    mrope_,
    rope,
    vision_rope,
)
from .vision_grid import (
    vision_cu_seqlens,
    vision_interp_taps,
    vision_position_ids,
    vision_window_index,
)

__all__ = [
    "apply_rotary_pos_emb",
    "apply_rotary_pos_emb_vision",
    "mrope",
    "mrope_",
    "mrope_position_ids",
    "pixel_shuffle",
    "pixel_unshuffle",
    "rope",
    "vision_rope",
    "mlp_projector",
    "cross_attention",
    "mllama_kv_ranges",
    "gated_linear",
    "patch_embed",
    "vision_cu_seqlens",
    "vision_position_ids",
    "vision_window_index",
    "vision_interp_taps",
]
