"""nn.Module wrappers over vlmkern ops."""

from .cross_attention import (
    Blip2QFormerAttention,
    Blip2QFormerMultiHeadAttention,
    MllamaCrossAttentionDecoderLayer,
    MllamaTextCrossAttention,
)
from .pixel_shuffle import PixelShuffle
from .rope import MRotary, VisionRotary

__all__ = [
    "MRotary",
    "PixelShuffle",
    "VisionRotary",
    "Blip2QFormerAttention",
    "Blip2QFormerMultiHeadAttention",
    "MllamaCrossAttentionDecoderLayer",
    "MllamaTextCrossAttention",
]
