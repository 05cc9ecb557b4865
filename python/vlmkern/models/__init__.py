"""Complete vision towers and VLMs assembled from vlmkern's ops and modules; they load HF state
dicts unchanged (``from_hf``) and equal HF's outputs."""

from .idefics3 import Idefics3, Idefics3VisionTransformer
from .internvl import InternVL, InternVLVisionTransformer
from .llava import Llava, vision_tower_from_hf
from .llava_next import LlavaNext
from .mllama import Mllama, MllamaVisionTransformer
from .paligemma import PaliGemma
from .qwen_vision import (
    Qwen2_5_VLVisionTransformer,
    Qwen2VLVisionTransformer,
    Qwen3VLVisionTransformer,
)
from .qwen_vl import QwenVL
from .vision_transformer import CLIPVisionTransformer, SiglipVisionTransformer
from .vlm import VisionLanguageModel, VLMOutput, scatter_features

__all__ = [
    "CLIPVisionTransformer",
    "Idefics3",
    "Idefics3VisionTransformer",
    "InternVL",
    "InternVLVisionTransformer",
    "Llava",
    "LlavaNext",
    "Mllama",
    "MllamaVisionTransformer",
    "PaliGemma",
    "Qwen2VLVisionTransformer",
    "Qwen2_5_VLVisionTransformer",
    "Qwen3VLVisionTransformer",
    "QwenVL",
    "SiglipVisionTransformer",
    "VLMOutput",
    "VisionLanguageModel",
    "scatter_features",
    "vision_tower_from_hf",
]
