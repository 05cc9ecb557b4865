"""How each HF module that :func:`vlmkern.integrations.hf.patch_model` replaces is rebuilt as a
vlmkern.nn module (on the meta device; the caller then hands it HF's parameters). Keyed by
``"<modeling file>.<class name>"``; a builder raises :class:`Skip` to leave a module alone."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import nn as vnn
from .hf_mllama import HFMllamaCrossAttentionDecoderLayer
from .hf_qformer import HFQFormerMultiHeadAttention


class Skip(Exception):
    """This module stays HF's; the message says why."""


@dataclass(frozen=True)
class Entry:
    kind: str  # the patch_model switch: "connector", "embedding", "cross_attention", ...
    build: Callable[[nn.Module, nn.Module], nn.Module]  # (HF module, root model) -> vlmkern


def _activation(act: nn.Module) -> str:
    """The HF ``projector_hidden_act`` name of an activation module vlmkern fuses."""
    from transformers import activations as hf_act

    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    names = {hf_act.GELUActivation: "gelu", hf_act.GELUTanh: "gelu_pytorch_tanh",
             hf_act.QuickGELUActivation: "quick_gelu", hf_act.LinearActivation: "linear"}
    if type(act) not in names:
        raise Skip(f"activation {type(act).__name__} is not one vlmkern fuses")
    return names[type(act)]


def _config_attr(root: nn.Module, name: str) -> Any:
    """``name`` from the root model's vision config (or its own config, for a vision model)."""
    config = getattr(root, "config", None)
    for c in (getattr(config, "vision_config", None), config):
        if c is not None and getattr(c, name, None) is not None:
            return getattr(c, name)
    raise Skip(f"the model's config has no {name}")


def _vision_config(hf: nn.Module, root: nn.Module) -> Any:
    config = getattr(hf, "config", None)
    if config is None:
        root_config = getattr(root, "config", None)
        config = getattr(root_config, "vision_config", None) or root_config
    if config is None:
        raise Skip("no vision config found")
    return config


# ---- connectors --------------------------------------------------------------------------------


def _llava(hf: nn.Module, root: nn.Module) -> nn.Module:
    l1 = hf.linear_1
    return vnn.LlavaMultiModalProjector(l1.in_features, l1.out_features, l1.bias is not None,
                                        _activation(hf.act))


def _internvl(hf: nn.Module, root: nn.Module) -> nn.Module:
    # HF shuffles before calling it: the module takes the shuffled (..., r²C) rows.
    l1 = hf.linear_1
    new = vnn.InternVLMultiModalProjector(l1.in_features, l1.out_features, 1.0,
                                          _activation(hf.act), fuse_pixel_shuffle=False)
    new.layer_norm.eps = hf.layer_norm.eps
    return new


def _qwen2_merger(hf: nn.Module, root: nn.Module) -> nn.Module:
    norm, fc1, act, fc2 = hf.ln_q, hf.mlp[0], hf.mlp[1], hf.mlp[2]
    if type(act) is not nn.GELU or act.approximate != "none":
        raise Skip(f"activation {act} is not erf GELU")
    context = norm.weight.shape[0]
    merge = math.isqrt(fc1.in_features // context)
    if isinstance(norm, nn.LayerNorm):
        new = vnn.Qwen2VLPatchMerger(fc2.out_features, context, merge)
        new.ln_q.eps = norm.eps
    elif hasattr(norm, "variance_epsilon"):
        new = vnn.Qwen2_5_VLPatchMerger(fc2.out_features, context, merge)
        new.ln_q.variance_epsilon = norm.variance_epsilon
    else:
        raise Skip(f"norm {type(norm).__name__} is not a LayerNorm or Qwen RMSNorm")
    return new


def _qwen3_merger(hf: nn.Module, root: nn.Module) -> nn.Module:
    if type(hf.act_fn) is not nn.GELU or hf.act_fn.approximate != "none":
        raise Skip(f"activation {hf.act_fn} is not erf GELU")
    merge = int(_config_attr(root, "spatial_merge_size"))
    new = vnn.Qwen3VLVisionPatchMerger(hf.hidden_size // merge**2, hf.linear_fc2.out_features,
                                       merge, hf.use_postshuffle_norm)
    new.norm.eps = hf.norm.eps
    return new


def _idefics3(hf: nn.Module, root: nn.Module) -> nn.Module:
    proj, scale = hf.modality_projection.proj, hf.scale_factor
    return vnn.Idefics3Connector(proj.in_features // scale**2, proj.out_features, scale)


def _paligemma(hf: nn.Module, root: nn.Module) -> nn.Module:
    return vnn.PaliGemmaMultiModalProjector(hf.linear.in_features, hf.linear.out_features)


# ---- vision embeddings -------------------------------------------------------------------------


def _clip(hf: nn.Module, root: nn.Module) -> nn.Module:
    return vnn.CLIPVisionEmbeddings(hf.config)


def _siglip(hf: nn.Module, root: nn.Module) -> nn.Module:
    return vnn.SiglipVisionEmbeddings(hf.config)


def _blip(hf: nn.Module, root: nn.Module) -> nn.Module:
    return vnn.Blip2VisionEmbeddings(hf.config)


def _internvit(hf: nn.Module, root: nn.Module) -> nn.Module:
    return vnn.InternVLVisionEmbeddings(_vision_config(hf, root))


def _qwen_patch_embed(hf: nn.Module, root: nn.Module) -> nn.Module:
    new = vnn.Qwen2VLPatchEmbed(hf.patch_size, hf.temporal_patch_size, hf.in_channels,
                                hf.embed_dim)
    if hf.proj.bias is not None:  # Qwen3-VL's conv has a bias
        kernel = hf.proj.kernel_size
        new.proj = nn.Conv3d(hf.in_channels, hf.embed_dim, kernel, stride=kernel, bias=True)
    return new


# ---- attention ---------------------------------------------------------------------------------


def _qwen_vision_attention(hf: nn.Module, root: nn.Module) -> nn.Module:
    if getattr(hf, "attention_dropout", 0.0):
        raise Skip(f"attention dropout {hf.attention_dropout} (vlmkern's has none)")
    implementation = str(getattr(hf.config, "_attn_implementation", None))
    if implementation.startswith("flash"):  # flash_attention_2 / 3 / 4 (kernels hub names too)
        raise Skip(f"HF's {implementation} path runs every segment in one varlen call already")
    qkv = hf.qkv if hasattr(hf, "qkv") else hf.q
    cls = vnn.QwenVisionAttention if hasattr(hf, "qkv") else vnn.Qwen2_5OmniVisionAttention
    return cls(hf.dim, hf.num_heads, qkv.bias is not None, hf.proj.bias is not None)


# ---- cross-attention ---------------------------------------------------------------------------


def _mllama_layer(hf: nn.Module, root: nn.Module) -> nn.Module:
    if hf.cross_attn.dropout:
        raise Skip(f"attention dropout {hf.cross_attn.dropout} (vlmkern's has none)")
    if hf.cross_attn.config._attn_implementation == "eager":
        raise Skip("eager attention returns attention weights (vlmkern's does not)")
    image, patch = _config_attr(root, "image_size"), _config_attr(root, "patch_size")
    tokens = (int(image) // int(patch)) ** 2 + 1  # HF's vision_model.num_patches
    return HFMllamaCrossAttentionDecoderLayer(hf.cross_attn.config, hf.layer_idx,
                                              num_vision_tokens=tokens)


def _qformer_attention(hf: nn.Module, root: nn.Module) -> nn.Module:
    if hf.config._attn_implementation == "eager":
        raise Skip("eager attention returns attention weights (vlmkern's does not)")
    return HFQFormerMultiHeadAttention(hf.config, hf.key.in_features != hf.query.in_features)


_CONNECTOR, _EMBEDDING, _XATTN = "connector", "embedding", "cross_attention"
_VIT_ATTN = "vision_attention"
BUILDERS: dict[str, Entry] = {
    "modeling_llava.LlavaMultiModalProjector": Entry(_CONNECTOR, _llava),
    "modeling_llava_next.LlavaNextMultiModalProjector": Entry(_CONNECTOR, _llava),
    "modeling_llava_next_video.LlavaNextVideoMultiModalProjector": Entry(_CONNECTOR, _llava),
    "modeling_llava_onevision.LlavaOnevisionMultiModalProjector": Entry(_CONNECTOR, _llava),
    "modeling_video_llava.VideoLlavaMultiModalProjector": Entry(_CONNECTOR, _llava),
    "modeling_internvl.InternVLMultiModalProjector": Entry(_CONNECTOR, _internvl),
    "modeling_qwen2_vl.PatchMerger": Entry(_CONNECTOR, _qwen2_merger),
    "modeling_qwen2_5_vl.Qwen2_5_VLPatchMerger": Entry(_CONNECTOR, _qwen2_merger),
    "modeling_qwen2_5_omni.Qwen2_5OmniPatchMerger": Entry(_CONNECTOR, _qwen2_merger),
    "modeling_qwen3_vl.Qwen3VLVisionPatchMerger": Entry(_CONNECTOR, _qwen3_merger),
    "modeling_qwen3_vl_moe.Qwen3VLMoeVisionPatchMerger": Entry(_CONNECTOR, _qwen3_merger),
    "modeling_idefics3.Idefics3Connector": Entry(_CONNECTOR, _idefics3),
    "modeling_smolvlm.SmolVLMConnector": Entry(_CONNECTOR, _idefics3),
    "modeling_paligemma.PaliGemmaMultiModalProjector": Entry(_CONNECTOR, _paligemma),
    "modeling_clip.CLIPVisionEmbeddings": Entry(_EMBEDDING, _clip),
    "modeling_siglip.SiglipVisionEmbeddings": Entry(_EMBEDDING, _siglip),
    "modeling_internvl.InternVLVisionEmbeddings": Entry(_EMBEDDING, _internvit),
    "modeling_blip_2.Blip2VisionEmbeddings": Entry(_EMBEDDING, _blip),
    "modeling_blip.BlipVisionEmbeddings": Entry(_EMBEDDING, _blip),
    "modeling_instructblip.InstructBlipVisionEmbeddings": Entry(_EMBEDDING, _blip),
    "modeling_instructblipvideo.InstructBlipVideoVisionEmbeddings": Entry(_EMBEDDING, _blip),
    "modeling_qwen2_vl.PatchEmbed": Entry(_EMBEDDING, _qwen_patch_embed),
    "modeling_qwen2_5_vl.Qwen2_5_VisionPatchEmbed": Entry(_EMBEDDING, _qwen_patch_embed),
    "modeling_qwen2_5_omni.Qwen2_5_VisionPatchEmbed": Entry(_EMBEDDING, _qwen_patch_embed),
    "modeling_qwen3_vl.Qwen3VLVisionPatchEmbed": Entry(_EMBEDDING, _qwen_patch_embed),
    "modeling_qwen3_vl_moe.Qwen3VLMoeVisionPatchEmbed": Entry(_EMBEDDING, _qwen_patch_embed),
    "modeling_glm4v.Glm4vVisionPatchEmbed": Entry(_EMBEDDING, _qwen_patch_embed),
    "modeling_mllama.MllamaCrossAttentionDecoderLayer": Entry(_XATTN, _mllama_layer),
    "modeling_blip_2.Blip2QFormerMultiHeadAttention": Entry(_XATTN, _qformer_attention),
    "modeling_instructblip.InstructBlipQFormerMultiHeadAttention":
        Entry(_XATTN, _qformer_attention),
    "modeling_instructblipvideo.InstructBlipVideoQFormerMultiHeadAttention":
        Entry(_XATTN, _qformer_attention),
    "modeling_qwen2_vl.VisionAttention": Entry(_VIT_ATTN, _qwen_vision_attention),
    "modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention": Entry(_VIT_ATTN, _qwen_vision_attention),
    "modeling_qwen2_5_omni.Qwen2_5OmniVisionAttention": Entry(_VIT_ATTN, _qwen_vision_attention),
    "modeling_qwen3_vl.Qwen3VLVisionAttention": Entry(_VIT_ATTN, _qwen_vision_attention),
    "modeling_qwen3_vl_moe.Qwen3VLMoeVisionAttention": Entry(_VIT_ATTN, _qwen_vision_attention),
    "modeling_glm4v.Glm4vVisionAttention": Entry(_VIT_ATTN, _qwen_vision_attention),
}


def is_hf(module: nn.Module) -> bool:
    """Whether a module's class comes from transformers."""
    return type(module).__module__.startswith("transformers.")


def builder_key(module: nn.Module) -> str:
    """``"<modeling file>.<class name>"`` of a module, the key of :data:`BUILDERS`."""
    return f"{type(module).__module__.rpartition('.')[2]}.{type(module).__name__}"
