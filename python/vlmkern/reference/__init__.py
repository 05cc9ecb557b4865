"""Plain-PyTorch ground truth for every vlmkern op (float64-capable), used by tests and benches."""

from .pixel_shuffle import pixel_shuffle, pixel_unshuffle

__all__ = ["pixel_shuffle", "pixel_unshuffle"]
