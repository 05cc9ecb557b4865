"""nn.Module wrappers over vlmkern ops."""

from .pixel_shuffle import PixelShuffle
from .rope import MRotary, VisionRotary

__all__ = ["MRotary", "PixelShuffle", "VisionRotary"]
