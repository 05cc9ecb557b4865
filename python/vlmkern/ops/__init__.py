"""Public functional ops. Each module registers fake (meta) kernels and autograd for its ops."""

from .pixel_shuffle import pixel_shuffle, pixel_unshuffle

__all__ = ["pixel_shuffle", "pixel_unshuffle"]
