"""vlmkern.nn patch-embedding modules vs HF's: strict state-dict loading (buffers included),
forward and gradients equal at tiny and real configs, uint8 pixels with the processor's
normalization folded in."""

import pytest
import torch
from transformers import (
    Blip2VisionConfig,
    CLIPVisionConfig,
    InternVLVisionConfig,
    SiglipVisionConfig,
)
from transformers.models.blip_2.modeling_blip_2 import Blip2VisionEmbeddings as HFBlip2
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings as HFClip
from transformers.models.internvl.modeling_internvl import InternVLVisionEmbeddings as HFIntern
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed as HFQwen2
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchEmbed
from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings as HFSiglip
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from vlmkern import nn as vnn

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# name: (HF config kwargs, pixel (H, W) for the resized-positions call)
IMAGE_MODELS = {
    "clip-tiny": (HFClip, vnn.CLIPVisionEmbeddings, CLIPVisionConfig,
                  {"hidden_size": 32, "num_attention_heads": 4, "image_size": 28, "patch_size": 7}),
    "clip-l14-336": (HFClip, vnn.CLIPVisionEmbeddings, CLIPVisionConfig,
                     {"hidden_size": 1024, "num_attention_heads": 16, "image_size": 336,
                      "patch_size": 14}),
    "siglip-tiny": (HFSiglip, vnn.SiglipVisionEmbeddings, SiglipVisionConfig,
                    {"hidden_size": 24, "num_attention_heads": 4, "image_size": 30,
                     "patch_size": 5}),
    "siglip-so400m": (HFSiglip, vnn.SiglipVisionEmbeddings, SiglipVisionConfig,
                      {"hidden_size": 1152, "num_attention_heads": 16, "image_size": 384,
                       "patch_size": 14}),
    "internvit-tiny": (HFIntern, vnn.InternVLVisionEmbeddings, InternVLVisionConfig,
                       {"hidden_size": 16, "num_attention_heads": 4, "image_size": [24, 24],
                        "patch_size": [4, 4]}),
    "internvit-448": (HFIntern, vnn.InternVLVisionEmbeddings, InternVLVisionConfig,
                      {"hidden_size": 1024, "num_attention_heads": 16, "image_size": [448, 448],
                       "patch_size": [14, 14]}),
    "blip2-tiny": (HFBlip2, vnn.Blip2VisionEmbeddings, Blip2VisionConfig,
                   {"hidden_size": 24, "num_attention_heads": 4, "image_size": 28,
                    "patch_size": 7}),
    "blip2-eva-g": (HFBlip2, vnn.Blip2VisionEmbeddings, Blip2VisionConfig,
                    {"hidden_size": 1408, "num_attention_heads": 16, "image_size": 224,
                     "patch_size": 14}),
}


def _pair(hf_cls, ours_cls, cfg_cls, kwargs, **ours_kwargs):
    cfg = cfg_cls(**kwargs)
    hf = hf_cls(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # InternVL initializes cls/positions to zero: randomize
            p.normal_(0, 0.5)
    ours = ours_cls(cfg, **ours_kwargs).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert set(dict(ours.named_buffers())) == set(dict(hf.named_buffers()))
    return cfg, hf, ours


def _call(module, x, resize):
    if isinstance(module, (HFIntern, vnn.InternVLVisionEmbeddings)):
        return module(x)
    return module(x, interpolate_pos_encoding=resize)


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("resize", [False, True], ids=["native", "resized"])
def test_image_module_matches_hf(name, resize):
    hf_cls, ours_cls, cfg_cls, kwargs = IMAGE_MODELS[name]
    cfg, hf, ours = _pair(hf_cls, ours_cls, cfg_cls, kwargs)
    size, patch = _pair_size(cfg.image_size), _pair_size(cfg.patch_size)
    hw = (size[0] + 3 * patch[0], size[1] - patch[1]) if resize else size
    x = torch.randn(2, 3, *hw, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ref, out = _call(hf, x, resize), _call(ours, x2, resize)
    assert ref.abs().max() > 0 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    if "tiny" not in name:
        return
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x2, *ours.parameters()], g)
    want = torch.autograd.grad(ref, [x, *hf.parameters()], g, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_module_low_precision_2x_rule(name, dtype):
    """G3(b): in bf16 / fp16, the error against HF's module run in float64 (the same weights and
    pixels, rounded to `dtype` first) is within 2x that of HF's own module run in `dtype`."""
    import copy

    hf_cls, ours_cls, cfg_cls, kwargs = IMAGE_MODELS[name]
    cfg, hf, ours = _pair(hf_cls, ours_cls, cfg_cls, kwargs)
    hf_low, ours = hf.to(dtype), ours.to(dtype)
    hf64 = copy.deepcopy(hf_low).double()
    x = torch.randn(2, 3, *_pair_size(cfg.image_size)).to(dtype)
    with torch.no_grad():
        ref, pt = _call(hf64, x.double(), False), _call(hf_low, x, False)
        got = _call(ours, x, False)
    assert got.dtype == dtype and got.shape == ref.shape
    e_ours, e_pt = (got.double() - ref).abs().max().item(), (pt.double() - ref).abs().max().item()
    assert e_pt > 0
    assert e_ours <= 2 * e_pt + 1e-6 * ref.abs().max().item()


def _pair_size(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


@pytest.mark.parametrize("name", ["clip-tiny", "siglip-tiny", "internvit-tiny"])
def test_uint8_module_equals_normalize_then_embed(name):
    hf_cls, ours_cls, cfg_cls, kwargs = IMAGE_MODELS[name]
    cfg, hf, ours = _pair(hf_cls, ours_cls, cfg_cls, kwargs, mean=CLIP_MEAN, std=CLIP_STD,
                          rescale=1 / 255)
    size = _pair_size(cfg.image_size)
    u = torch.randint(0, 256, (3, 3, *size), dtype=torch.uint8)
    x = (u.float() / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(
        3, 1, 1)
    ref = _call(hf, x, False)
    torch.testing.assert_close(_call(ours, u, False), ref, rtol=1e-5,
                               atol=1e-5 * ref.abs().max().item())


def test_clip_module_rejects_other_sizes_without_interpolation():
    _, _, ours = _pair(*IMAGE_MODELS["clip-tiny"])
    with pytest.raises(ValueError, match=r"doesn't match model"):
        ours(torch.randn(1, 3, 35, 28))


@pytest.mark.parametrize(("patch", "dim"), [(4, 16), (14, 1280)], ids=["tiny", "qwen2-vl"])
def test_qwen2_patch_embed_matches_hf(patch, dim):
    hf = HFQwen2(patch_size=patch, temporal_patch_size=2, in_channels=3, embed_dim=dim)
    ours = vnn.Qwen2VLPatchEmbed(patch, 2, 3, dim)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(3 * 40, 3 * 2 * patch * patch)
    ref = hf(x)
    torch.testing.assert_close(ours(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    grid = torch.tensor([[1, 4, 10], [2, 2, 20]])
    torch.testing.assert_close(ours(x, grid), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize(("cfg_kwargs", "grid"), [
    ({"hidden_size": 32, "num_heads": 4, "patch_size": 4, "num_position_embeddings": 36},
     [[1, 4, 6], [2, 8, 4], [1, 2, 2]]),
    ({"hidden_size": 1152, "num_heads": 16}, [[1, 32, 48], [2, 12, 10]]),
], ids=["tiny", "qwen3-vl"])
def test_qwen3_patch_embed_and_positions_match_hf(cfg_kwargs, grid):
    cfg = Qwen3VLVisionConfig(**cfg_kwargs)
    hf_proj, hf_pos = Qwen3VLVisionPatchEmbed(cfg), torch.nn.Embedding(
        cfg.num_position_embeddings, cfg.hidden_size)
    ours = vnn.Qwen3VLPatchEmbed(cfg)
    state = {**{f"patch_embed.{k}": v for k, v in hf_proj.state_dict().items()},
             **{f"pos_embed.{k}": v for k, v in hf_pos.state_dict().items()}}
    ours.load_state_dict(state, strict=True)
    grid = torch.tensor(grid)
    x = torch.randn(int(grid.prod(1).sum()), hf_proj.proj.weight[0].numel())
    side = int(cfg.num_position_embeddings**0.5)
    idx, w = get_vision_interpolation_indices_and_weights(
        grid, side, mode="bilinear", align_corners=True,
        spatial_merge_size=cfg.spatial_merge_size)
    with torch.no_grad():
        ref = hf_proj(x) + (hf_pos(idx) * w[:, :, None]).sum(1)
        out, cu = ours(x, grid)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    counts = grid.prod(1)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *counts.cumsum(0).tolist()]


def test_qwen3_patch_embed_loads_the_vision_models_own_keys():
    """The `patch_embed.*` and `pos_embed.*` entries of a whole Qwen3VLVisionModel's state dict
    load strictly, and the module then equals the model's own patch embedding + positions."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    cfg = Qwen3VLVisionConfig(hidden_size=32, num_heads=4, patch_size=4, depth=1,
                              num_position_embeddings=36, intermediate_size=64)
    model = Qwen3VLVisionModel(cfg).eval()
    with torch.no_grad():
        model.pos_embed.weight.normal_()
    state = {k: v for k, v in model.state_dict().items()
             if k.startswith(("patch_embed.", "pos_embed."))}  # fmt: skip
    assert {k.split(".")[0] for k in state} == {"patch_embed", "pos_embed"}
    ours = vnn.Qwen3VLPatchEmbed(cfg)
    ours.load_state_dict(state, strict=True)
    grid = torch.tensor([[1, 4, 6], [2, 2, 4]])
    x = torch.randn(int(grid.prod(1).sum()), model.patch_embed.proj.weight[0].numel())
    idx, w = get_vision_interpolation_indices_and_weights(
        grid, 6, mode="bilinear", align_corners=True, spatial_merge_size=cfg.spatial_merge_size)
    with torch.no_grad():
        ref = model.patch_embed(x) + (model.pos_embed(idx) * w[:, :, None]).sum(1)
        out, _ = ours(x, grid)
    assert ref.abs().max() > 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("name", ["clip-tiny", "siglip-tiny", "internvit-tiny", "qwen2", "qwen3"])
def test_wrapped_or_hooked_patch_conv_is_refused(name):
    """The fused op reads the patch conv's weights directly: a hook (or a PEFT wrapper) on it would
    be bypassed silently, so the module refuses with a clear error instead."""
    if name == "qwen2":
        ours = vnn.Qwen2VLPatchEmbed(4, 2, 3, 16)
        conv = ours.proj
        x = torch.randn(8, 3 * 2 * 4 * 4)

        def call():
            return ours(x)
    elif name == "qwen3":
        cfg = Qwen3VLVisionConfig(hidden_size=32, num_heads=4, patch_size=4,
                                  num_position_embeddings=36)
        ours = vnn.Qwen3VLPatchEmbed(cfg)
        conv = ours.patch_embed.proj
        x, grid = torch.randn(24, conv.weight[0].numel()), torch.tensor([[1, 4, 6]])

        def call():
            return ours(x, grid)
    else:
        cfg, _, ours = _pair(*IMAGE_MODELS[name])
        conv = ours.patch_embeddings.projection if name == "internvit-tiny" \
            else ours.patch_embedding
        size = _pair_size(cfg.image_size)
        x = torch.randn(1, 3, *size)

        def call():
            return _call(ours, x, False)
    call()  # plain: runs
    conv.register_forward_hook(lambda mod, inp, out: out * 2)
    with pytest.raises(NotImplementedError, match=r"wrapped or hooked"):
        call()


def test_blip2_smaller_image_takes_a_prefix_of_the_positions():
    """Without interpolate_pos_encoding HF adds the table's first tokens (a prefix of the rows);
    more tokens than positions is an error in both."""
    _, hf, ours = _pair(*IMAGE_MODELS["blip2-tiny"])
    x = torch.randn(2, 3, 21, 27)  # a 3 x 3 grid of 7-pixel patches, 6 pixels cropped
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)
    big = torch.randn(1, 3, 35, 28)
    with pytest.raises(RuntimeError):
        hf(big)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        ours(big)
