"""Public functional ops. Each module registers fake (meta) kernels and autograd for its ops."""

from .mrope_position_ids import mrope_position_ids
from .pixel_shuffle import pixel_shuffle, pixel_unshuffle

__all__ = ["mrope_position_ids", "pixel_shuffle", "pixel_unshuffle"]
