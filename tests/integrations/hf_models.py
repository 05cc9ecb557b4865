"""Tiny HF transformers VLMs (random weights, seconds on a CPU) and inputs that exercise their
image paths, for the drop-in tests: name -> (model in eval mode, forward kwargs)."""

from __future__ import annotations

from collections import Counter

import torch
import transformers as T

IMAGE_TOKEN = 151
_LLAMA = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=160)
_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _ids(images: int, batch: int = 1) -> torch.Tensor:
    row = [1, 5] + [IMAGE_TOKEN] * images + [7, 8]
    return torch.tensor([row] * batch)


def llava(vision_head_dim: int = 8):
    """``vision_head_dim``: the CLIP tower's (4 heads); 64 reaches the CUDA attention kernels."""
    vc = T.CLIPVisionConfig(**dict(_VIT, hidden_size=4 * vision_head_dim), image_size=28,
                            patch_size=14)
    cfg = T.LlavaConfig(vision_config=vc, text_config=T.LlamaConfig(**_LLAMA),
                        image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)
    return T.LlavaForConditionalGeneration(cfg), dict(input_ids=_ids(4, 2),
                                                      pixel_values=torch.randn(2, 3, 28, 28))


def _qwen(family: str, vision_head_dim: int = 8):
    """``vision_head_dim``: the ViT's (4 heads); 64 reaches the CUDA attention kernels."""
    width = 4 * vision_head_dim
    txt = dict(_LLAMA, rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2],
                                        "rope_theta": 10000.0})
    vis = dict(depth=2, num_heads=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if family == "qwen2_vl":
        vis.update(embed_dim=width, hidden_size=48, mlp_ratio=2, patch_size=14)
        config, model = T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        vis.update(hidden_size=width, out_hidden_size=48, intermediate_size=64, patch_size=14,
                   fullatt_block_indexes=[1], window_size=56)
        config, model = T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration
    else:  # Qwen3-VL, Qwen3-VL-MoE
        vis.update(hidden_size=width, out_hidden_size=48, intermediate_size=64, patch_size=16,
                   num_position_embeddings=16, deepstack_visual_indexes=[0])
        txt = dict(txt, head_dim=12)
        txt["rope_parameters"] = dict(txt["rope_parameters"], mrope_interleaved=True)
        config, model = T.Qwen3VLConfig, T.Qwen3VLForConditionalGeneration
        if family == "qwen3_vl_moe":
            txt.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
            config, model = T.Qwen3VLMoeConfig, T.Qwen3VLMoeForConditionalGeneration
    cfg = config(vision_config=vis, text_config=txt, image_token_id=IMAGE_TOKEN,
                 video_token_id=152, vision_start_token_id=150)
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]])  # two images, 24 + 4 patches
    p = cfg.vision_config.patch_size
    ids = torch.tensor([[1, 150] + [IMAGE_TOKEN] * 6 + [7, 150] + [IMAGE_TOKEN] + [8]])
    return model(cfg), dict(input_ids=ids, pixel_values=torch.randn(28, 3 * 2 * p * p),
                            image_grid_thw=grid, mm_token_type_ids=(ids == IMAGE_TOKEN).long())


def internvl(vision_head_dim: int = 8):
    """``vision_head_dim``: InternViT's (4 heads); 64 reaches the CUDA attention kernels."""
    vc = dict(_VIT, hidden_size=4 * vision_head_dim, image_size=[56, 56], patch_size=[14, 14])
    cfg = T.InternVLConfig(vision_config=vc, text_config=dict(_LLAMA, model_type="qwen2"),
                           image_token_id=IMAGE_TOKEN, downsample_ratio=0.5)
    return T.InternVLForConditionalGeneration(cfg), dict(input_ids=_ids(4, 2),
                                                         pixel_values=torch.randn(2, 3, 56, 56))


def _idefics3(family: str):
    config = T.Idefics3Config if family == "idefics3" else T.SmolVLMConfig
    model = (T.Idefics3ForConditionalGeneration if family == "idefics3"
             else T.SmolVLMForConditionalGeneration)
    cfg = config(vision_config=dict(_VIT, image_size=56, patch_size=14),
                 text_config=dict(_LLAMA, model_type="llama"), image_token_id=IMAGE_TOKEN,
                 scale_factor=2)
    return model(cfg), dict(input_ids=_ids(4), pixel_values=torch.randn(1, 1, 3, 56, 56))


def paligemma():
    vc = dict(_VIT, image_size=28, patch_size=14, projection_dim=48)
    tc = dict(_LLAMA, model_type="gemma", num_key_value_heads=1, head_dim=12)
    cfg = T.PaliGemmaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN,
                            projection_dim=48)
    return T.PaliGemmaForConditionalGeneration(cfg), dict(input_ids=_ids(4),
                                                          pixel_values=torch.randn(1, 3, 28, 28))


def gemma3():
    """SigLIP tower (its embeddings swapped), Gemma 3's pooled projector and text model (HF's)."""
    vc = dict(_VIT, image_size=56, patch_size=14)
    tc = dict(_LLAMA, num_key_value_heads=2, head_dim=12, sliding_window=16)
    cfg = T.Gemma3Config(vision_config=vc, text_config=tc, mm_tokens_per_image=4,
                         image_token_index=IMAGE_TOKEN, boi_token_index=150, eoi_token_index=149)
    model = T.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # HF initializes it to 0, which would hide the image path
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    ids = torch.tensor([[2, 5, 150] + [IMAGE_TOKEN] * 4 + [149, 7, 8]])
    return model, dict(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56),
                       token_type_ids=(ids == IMAGE_TOKEN).long())


MLLAMA_TILE_TOKENS = (28 // 14) ** 2 + 1


def mllama():
    """Text model with one cross-attention layer, fed image states directly (the vision tower is
    HF's); the tile mask has rows that see no image, one tile, and both images."""
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
              attention_heads=4, image_size=28, patch_size=14, max_num_tiles=2,
              intermediate_layers_indices=[0], vision_output_dim=64,
              supported_aspect_ratios=[[1, 1], [1, 2]])
    # head dim 64: on CUDA in bf16 / fp16 the cross-attention kernel itself runs
    tc = dict(hidden_size=256, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=160, cross_attention_layers=[1], pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
    model = T.MllamaForConditionalGeneration(T.MllamaConfig(vision_config=vc, text_config=tc))
    with torch.no_grad():  # HF initializes the gates to 0, which would hide the branches
        for name, p in model.named_parameters():  # (the gates, not the gated embeddings)
            if "gate" in name.rsplit(".", 1)[-1]:
                p.fill_(0.7)
    b, s, images, tiles = 2, 7, 2, 2
    mask = torch.zeros(b, s, images, tiles, dtype=torch.long)
    mask[0, 2:, 0, :1] = 1
    mask[0, 4:, 1, :] = 1
    mask[1, 1:5, 0, :] = 1
    mask[1, 3:, 1, 1:] = 1
    states = torch.randn(b, images * tiles * MLLAMA_TILE_TOKENS, 256)
    return model, dict(input_ids=torch.randint(3, 150, (b, s)), cross_attention_states=states,
                       cross_attention_mask=mask)


def blip_2():
    """EVA-style tower (its embeddings swapped), the Q-Former (its attention swapped: head dim 64,
    so the CUDA kernel runs in bf16 / fp16; no dropout, so training steps compare) and OPT."""
    vc = dict(_VIT, image_size=28, patch_size=7)
    qc = dict(hidden_size=128, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
              encoder_hidden_size=32, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
              cross_attention_frequency=1)
    tc = dict(model_type="opt", hidden_size=48, ffn_dim=64, num_hidden_layers=2,
              num_attention_heads=4, vocab_size=160, word_embed_proj_dim=48,
              max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
    cfg = T.Blip2Config(vision_config=vc, qformer_config=qc, text_config=tc, num_query_tokens=4,
                        image_token_index=IMAGE_TOKEN)
    ids = torch.tensor([[IMAGE_TOKEN] * 4 + [2, 5, 6, 7]] * 2)
    return T.Blip2ForConditionalGeneration(cfg), dict(input_ids=ids,
                                                      pixel_values=torch.randn(2, 3, 28, 28))


MODELS = {
    "llava": llava,
    "qwen2_vl": lambda: _qwen("qwen2_vl"),
    "qwen2_5_vl": lambda: _qwen("qwen2_5_vl"),
    "qwen3_vl": lambda: _qwen("qwen3_vl"),
    "qwen3_vl_moe": lambda: _qwen("qwen3_vl_moe"),
    "internvl": internvl,
    "idefics3": lambda: _idefics3("idefics3"),
    "smolvlm": lambda: _idefics3("smolvlm"),
    "paligemma": paligemma,
    "gemma3": gemma3,
    "mllama": mllama,
    "blip_2": blip_2,
}



def _vit_attention(cls: str) -> dict[str, str]:
    return {f"model.visual.blocks.{i}.attn": cls for i in range(2)}


# What patch_model must replace in each: module path -> HF class.
EXPECTED = {
    "llava": {"model.vision_tower.embeddings": "CLIPVisionEmbeddings",
              "model.multi_modal_projector": "LlavaMultiModalProjector"},
    "qwen2_vl": {"model.visual.patch_embed": "PatchEmbed", "model.visual.merger": "PatchMerger",
                 **_vit_attention("VisionAttention")},
    "qwen2_5_vl": {"model.visual.patch_embed": "Qwen2_5_VisionPatchEmbed",
                   "model.visual.merger": "Qwen2_5_VLPatchMerger",
                   **_vit_attention("Qwen2_5_VLVisionAttention")},
    "qwen3_vl": {"model.visual.patch_embed": "Qwen3VLVisionPatchEmbed",
                 "model.visual.merger": "Qwen3VLVisionPatchMerger",
                 "model.visual.deepstack_merger_list.0": "Qwen3VLVisionPatchMerger",
                 **_vit_attention("Qwen3VLVisionAttention")},
    "qwen3_vl_moe": {"model.visual.patch_embed": "Qwen3VLMoeVisionPatchEmbed",
                     "model.visual.merger": "Qwen3VLMoeVisionPatchMerger",
                     "model.visual.deepstack_merger_list.0": "Qwen3VLMoeVisionPatchMerger",
                     **_vit_attention("Qwen3VLMoeVisionAttention")},
    "internvl": {"model.vision_tower.embeddings": "InternVLVisionEmbeddings",
                 "model.multi_modal_projector": "InternVLMultiModalProjector"},
    "idefics3": {"model.connector": "Idefics3Connector"},
    "smolvlm": {"model.connector": "SmolVLMConnector"},
    "paligemma": {"model.vision_tower.embeddings": "SiglipVisionEmbeddings",
                  "model.multi_modal_projector": "PaliGemmaMultiModalProjector"},
    "gemma3": {"model.vision_tower.embeddings": "SiglipVisionEmbeddings"},
    "mllama": {"model.language_model.layers.1": "MllamaCrossAttentionDecoderLayer"},
    "blip_2": {"vision_model.embeddings": "Blip2VisionEmbeddings",
               **{f"qformer.encoder.layer.{i}.{part}.attention": "Blip2QFormerMultiHeadAttention"
                  for i in range(2) for part in ("attention", "crossattention")}},
}

# vlmkern ops each patched model must run (profiler names, "vlmkern::<op>").
OPS = {
    "llava": {"patch_embed", "mlp_projector"},
    "qwen2_vl": {"patch_embed_packed", "mlp_projector", "rope_cos_sin", "cross_attention",
                 "mrope_position_ids"},
    "qwen2_5_vl": {"patch_embed_packed", "mlp_projector", "rope_cos_sin", "cross_attention",
                   "mrope_position_ids"},
    "qwen3_vl": {"patch_embed_packed", "mlp_projector", "rope_cos_sin", "cross_attention",
                 "mrope_position_ids"},
    "qwen3_vl_moe": {"patch_embed_packed", "mlp_projector", "rope_cos_sin", "cross_attention",
                     "mrope_position_ids"},
    "internvl": {"patch_embed", "mlp_projector", "pixel_shuffle"},
    "idefics3": {"mlp_projector"},
    "smolvlm": {"mlp_projector"},
    "paligemma": {"patch_embed", "mlp_projector"},
    "gemma3": {"patch_embed"},
    "mllama": {"cross_attention", "gated_linear", "mllama_kv_ranges"},
    "blip_2": {"patch_embed", "cross_attention"},
}


def vision_encoder(family: str) -> torch.nn.Module:
    """A vision tower alone: Qwen2.5-Omni's (Qwen2.5-VL's ViT with separate q / k / v) or
    GLM-4.1V's (no attention biases)."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as omni

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=48,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_5_omni":
        cfg = omni.Qwen2_5OmniVisionEncoderConfig(**vision, window_size=56,
                                                  fullatt_block_indexes=[1])
        return omni.Qwen2_5OmniVisionEncoder(cfg)
    text = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=160)
    cfg = T.Glm4vConfig(vision_config=dict(vision, image_size=56), text_config=text)
    return T.Glm4vForConditionalGeneration(cfg).model.visual


def vlmkern_calls(fn) -> Counter:
    """How often each vlmkern op ran while fn() ran (CPU profiler events; names without the
    ``vlmkern::`` prefix)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name.removeprefix("vlmkern::") for e in prof.events()
                   if e.name.startswith("vlmkern::"))


def mllama_pixel_inputs() -> dict:
    """The Mllama model's own image path: pixels of 2 images x 2 tiles per text row, aspect
    ratios, a tile mask with rows that see nothing, left padding on row 1."""
    b, s = 2, 9
    ids = torch.randint(3, 150, (b, s))
    attention = torch.ones(b, s, dtype=torch.long)
    attention[1, :3], ids[1, :3] = 0, 0
    mask = torch.zeros(b, s, 2, 2, dtype=torch.long)
    mask[0, 2:, 0, :1] = 1
    mask[0, 5:, 1, :] = 1
    mask[1, 4:, 0, :] = 1
    mask[1, 6:, 1, 1:] = 1
    return dict(input_ids=ids, attention_mask=attention,
                pixel_values=torch.randn(b, 2, 2, 3, 28, 28),
                aspect_ratio_ids=torch.tensor([[1, 2], [2, 1]]),
                aspect_ratio_mask=torch.tensor([[[1, 0], [1, 1]], [[1, 1], [1, 0]]]),
                cross_attention_mask=mask)


def qwen_video_inputs() -> dict:
    """A 2-frame video for the Qwen2-VL model: two ViT segments of 16 patches."""
    ids = torch.tensor([[1, 150] + [152] * 8 + [7, 8]])
    return dict(input_ids=ids, pixel_values_videos=torch.randn(32, 3 * 2 * 14 * 14),
                video_grid_thw=torch.tensor([[2, 4, 4]]), mm_token_type_ids=(ids == 152).long() * 2)


def on(inputs: dict, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
            for k, v in inputs.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def assert_grads_close(got: dict, expected: dict, rtol: float = 1e-4) -> None:
    """Every gradient of ``expected`` matched in ``got`` (the same names) within ``rtol`` of its
    own max. A gradient that is 0 in exact math (a key bias under softmax) is rounding noise in
    both: its error is measured against a thousandth of the largest gradient."""
    assert got.keys() == expected.keys()
    floor = 1e-3 * max(g.abs().max().item() for g in expected.values())
    for n, g in expected.items():
        err = (got[n].double() - g.double()).abs().max().item()
        assert err <= rtol * max(g.abs().max().item(), floor), n


def assert_generate_equals_hf(hf, vk, inputs: dict, steps: int = 6) -> None:
    """vlmkern.models VLM ``vk``'s greedy tokens equal HF's ``generate`` on ``inputs`` (HF's
    keyword arguments; ``vk`` gets the same), and so do the logits of every step (1e-5 of their
    max: a wrong decode position shows there before it flips a token)."""
    hf.generation_config.pad_token_id = 0
    expected = hf.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                           output_logits=True, return_dict_in_generate=True)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    got, logits = vk.generate(inputs["input_ids"], steps, output_logits=True, **rest)
    assert torch.equal(got, expected.sequences), (got, expected.sequences)
    assert rel(logits, torch.stack(expected.logits, 1)) <= 1e-5


def prefill_host_reads(vk, input_ids: torch.Tensor, args: dict) -> list[str]:
    """Compiles the VLM ``vk``'s prefill (``vk(input_ids, **args).logits``) with fullgraph:
    one graph whose logits equal eager's (1e-6); returns the stack traces of its host reads
    (item / tolist and their asserts: each a host sync on CUDA)."""
    from testing_utils import compile_recording, sync_points

    def prefill(ids):
        return vk(ids, **args).logits

    # HF's RMSNorm eps, seen with other values by earlier compiles of the same code, would come
    # in as a dynamic float (an item() of a CPU scalar, not a device read): start afresh
    torch._dynamo.reset()
    compiled, graphs = compile_recording(prefill)
    with torch.no_grad():
        got, expected = compiled(input_ids), prefill(input_ids)
    assert len(graphs) == 1, len(graphs)
    assert rel(got, expected) <= 1e-6
    nodes = {n.name: n for n in graphs[0].graph.nodes}
    return [nodes[n].meta.get("stack_trace", n) for n in sync_points(graphs[0])]


def assert_cuda_bf16_follows_hf(hf32, from_hf, inputs: dict, sync_free) -> None:
    """On CUDA: the VLM ``from_hf(bf16 copy of hf32)``'s logits on ``inputs`` (HF's keyword
    arguments, fp32) are within 2x the error of HF's own bf16 model vs ``hf32`` (+1e-3 of the
    max); ``sync_free(vk16, input_ids, bf16 args)`` (vlmkern's side of the forward) runs
    without a host sync."""
    import copy

    from testing_utils import no_host_sync

    hf16 = copy.deepcopy(hf32).bfloat16()
    vk16 = from_hf(hf16)
    inputs16 = on(inputs, "cuda", torch.bfloat16)
    ids = inputs["input_ids"]
    args = {k: v for k, v in inputs16.items() if k != "input_ids"}
    with torch.no_grad():
        ref = hf32(**inputs).logits
        pt_err = (hf16(**inputs16).logits.float() - ref).abs().max()
        with no_host_sync():
            sync_free(vk16, ids, args)
        err = (vk16(ids, **args).logits.float() - ref).abs().max()
    assert ref.abs().max() > 0 and err <= 2 * pt_err + 1e-3 * ref.abs().max()


def assert_copies_load_both_ways(pairs) -> None:
    """For each (vlmkern module, HF module) pair: the same state-dict keys; ours loads HF's
    strictly into copies (not shared storage) and HF's loads ours (perturbed) strictly."""
    import copy

    for ours, theirs in pairs:
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        back = copy.deepcopy(theirs)
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(1.0)
        back.load_state_dict(ours.state_dict(), strict=True)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        for key, t in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], t)
            assert torch.equal(back.state_dict()[key], t + 1.0)
            assert ours.state_dict()[key].data_ptr() != t.data_ptr()
