"""nn.Module wrappers over vlmkern ops."""

from .patch_embed import (
    CLIPVisionEmbeddings,
    InternVLVisionEmbeddings,
    Qwen2VLPatchEmbed,
    Qwen3VLPatchEmbed,
    SiglipVisionEmbeddings,
)
from .pixel_shuffle import PixelShuffle
from .rope import MRotary, VisionRotary

__all__ = [
    "MRotary",
    "PixelShuffle",
    "VisionRotary",
    "CLIPVisionEmbeddings",
    "InternVLVisionEmbeddings",
    "Qwen2VLPatchEmbed",
    "Qwen3VLPatchEmbed",
    "SiglipVisionEmbeddings",
]
