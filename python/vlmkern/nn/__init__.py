"""nn.Module wrappers over vlmkern ops."""

from .cross_attention import (
    Blip2QFormerAttention,
    Blip2QFormerMultiHeadAttention,
    MllamaCrossAttentionDecoderLayer,
    MllamaTextCrossAttention,
)
from .patch_embed import (
    Blip2VisionEmbeddings,
    CLIPVisionEmbeddings,
    InternVLVisionEmbeddings,
    Qwen2VLPatchEmbed,
    Qwen3VLPatchEmbed,
    SiglipVisionEmbeddings,
)
from .pixel_shuffle import PixelShuffle
from .projector import (
    Idefics3Connector,
    InternVLMultiModalProjector,
    LlavaMultiModalProjector,
    PaliGemmaMultiModalProjector,
    Qwen2_5_VLPatchMerger,
    Qwen2VLPatchMerger,
    Qwen3VLVisionPatchMerger,
    QwenRMSNorm,
    SmolVLMConnector,
)
from .rope import MRotary, VisionRotary
from .vision_attention import Qwen2_5OmniVisionAttention, QwenVisionAttention

__all__ = [
    "MRotary",
    "PixelShuffle",
    "VisionRotary",
    "Idefics3Connector",
    "InternVLMultiModalProjector",
    "LlavaMultiModalProjector",
    "PaliGemmaMultiModalProjector",
    "Qwen2VLPatchMerger",
    "Qwen2_5_VLPatchMerger",
    "Qwen3VLVisionPatchMerger",
    "QwenRMSNorm",
    "SmolVLMConnector",
    "Blip2QFormerAttention",
    "Blip2QFormerMultiHeadAttention",
    "MllamaCrossAttentionDecoderLayer",
    "MllamaTextCrossAttention",
    "QwenVisionAttention",
    "Qwen2_5OmniVisionAttention",
    "Blip2VisionEmbeddings",
    "CLIPVisionEmbeddings",
    "InternVLVisionEmbeddings",
    "Qwen2VLPatchEmbed",
    "Qwen3VLPatchEmbed",
    "SiglipVisionEmbeddings",
]
