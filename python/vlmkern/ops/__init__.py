"""Public functional ops. Each module registers fake (meta) kernels and autograd for its ops."""

from .pixel_shuffle import pixel_shuffle, pixel_unshuffle
from .rope import mrope, mrope_, rope, vision_rope

__all__ = ["mrope", "mrope_", "pixel_shuffle", "pixel_unshuffle", "rope", "vision_rope"]
