"""nn.Module wrappers over vlmkern ops."""

from .pixel_shuffle import PixelShuffle

__all__ = ["PixelShuffle"]
