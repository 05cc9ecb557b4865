"""Plain-PyTorch ground truth for every vlmkern op (float64-capable), used by tests and benches."""

from .cross_attention import cross_attention, mllama_kv_ranges
from .gated_linear import gated_linear
from .mlp_projector import mlp_projector
from .mrope_position_ids import mrope_position_ids
from .patch_embed import patch_embed
from .pixel_shuffle import pixel_shuffle, pixel_unshuffle
from .rope import apply_rotary_pos_emb, mrope, rope, vision_rope

__all__ = [
    "apply_rotary_pos_emb",
    "mrope",
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
]
