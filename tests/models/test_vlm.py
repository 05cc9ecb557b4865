"""vlmkern.models' complete VLMs (Llava, QwenVL) built from tiny HF models: logits, greedy
generation (left-padded batches, decode steps on the KV cache) and gradients equal HF's; the
vlmkern ops run; the prefill compiles as one graph without host reads; bad inputs raise."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from integrations.hf_models import (
    IMAGE_TOKEN,
    _qwen,
    assert_cuda_bf16_follows_hf,
    assert_generate_equals_hf,
    assert_grads_close,
    internvl,
    llava,
    on,
    prefill_host_reads,
    qwen_video_inputs,
    rel,
)
from integrations.hf_models import vlmkern_calls as _calls

pytest.importorskip("transformers")
from vlmkern.models import InternVL, Llava, QwenVL, vision_tower_from_hf  # noqa: E402

VIDEO_TOKEN = 152  # the tiny Qwen models' video_token_id
FAMILIES = ["llava", "internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
# The vlmkern ops each family runs on the CPU (profiler names).
# On the CPU the CLIP tower attends with SDPA (faster there: models/vision_transformer.py).
QWEN_OPS = {"patch_embed_packed", "rope_cos_sin", "cross_attention", "mlp_projector",
            "mrope_position_ids"}
OPS = {"llava": {"patch_embed", "mlp_projector"}, "internvl": {"patch_embed", "mlp_projector"},
       **dict.fromkeys(FAMILIES[2:], QWEN_OPS)}
BUILDERS = {"llava": (llava, Llava), "internvl": (internvl, InternVL)}


def _build(family: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
           vision_head_dim: int = 8):
    build, cls = BUILDERS.get(family, (lambda d: _qwen(family, d), QwenVL))
    hf, inputs = build(vision_head_dim)
    hf = hf.to(device, dtype).eval()
    return hf, cls.from_hf(hf).eval(), on(inputs, device, dtype)


def _vk_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "input_ids"}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_hf(family):
    hf, vk, inputs = _build(family)
    with torch.no_grad():
        expected = hf(**inputs).logits
        got = vk(inputs["input_ids"], **_vk_inputs(inputs)).logits
    assert expected.abs().max() > 0
    assert got.shape == expected.shape and rel(got, expected) <= 1e-5


def test_qwen_video_equals_hf():
    hf, vk, _ = _build("qwen2_vl")
    inputs = qwen_video_inputs()
    with torch.no_grad():
        expected = hf(**inputs).logits
        got = vk(inputs["input_ids"], **_vk_inputs(inputs)).logits
    assert rel(got, expected) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_vlmkern_ops_run(family):
    _, vk, inputs = _build(family)
    with torch.no_grad():
        calls = _calls(lambda: vk(inputs["input_ids"], **_vk_inputs(inputs)))
    assert OPS[family] <= set(calls), calls


def _left_padded(inputs: dict) -> dict:
    """Two rows of the model's prompt: the first after two more text tokens, the second after
    two pad tokens (masked), so positions, masks and the cache see left padding."""
    ids = inputs["input_ids"][:1]
    out = dict(inputs, input_ids=torch.cat([torch.tensor([[5, 6], [0, 0]]), ids.repeat(2, 1)], 1),
               attention_mask=torch.tensor([[1] * 2 + [1] * ids.shape[1],
                                            [0] * 2 + [1] * ids.shape[1]]))
    if "image_grid_thw" in inputs:  # Qwen: one row of patches per image, images in row order
        out["pixel_values"] = inputs["pixel_values"].repeat(2, 1)
        out["image_grid_thw"] = inputs["image_grid_thw"].repeat(2, 1)
        out["mm_token_type_ids"] = (out["input_ids"] == IMAGE_TOKEN).long()
    else:  # LLaVA: one image per row
        out["pixel_values"] = inputs["pixel_values"][:1].repeat(2, 1, 1, 1)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_generate_equals_hf(family, padded):
    hf, vk, inputs = _build(family)
    assert_generate_equals_hf(hf, vk, _left_padded(inputs) if padded else inputs)


def _video(frames: int, side: int, image: bool = False, split: bool = False, patch: int = 14,
           **extra) -> dict:
    """One prompt with a ``frames`` x ``side`` x ``side`` video (2x2 merge), after an image when
    ``image`` (the tiny models' 4 x 6 one); ``split``: text between frames (Qwen3-VL's
    processor puts timestamps there)."""
    per_frame, ids, inputs = side * side // 4, [1, 150], {}
    if image:
        ids += [IMAGE_TOKEN] * 6 + [7, 150]
        inputs.update(pixel_values=torch.randn(24, 3 * 2 * patch * patch),
                      image_grid_thw=torch.tensor([[1, 4, 6]]))
    frame_runs = [[VIDEO_TOKEN] * per_frame] * frames if split else [[VIDEO_TOKEN] * per_frame
                                                                     * frames]
    for i, run in enumerate(frame_runs):
        ids += ([9] if i else []) + run
    ids = torch.tensor([ids + [7, 8]])
    types = (ids == IMAGE_TOKEN).long() + 2 * (ids == VIDEO_TOKEN).long()
    return dict(inputs, input_ids=ids, mm_token_type_ids=types,
                pixel_values_videos=torch.randn(frames * side * side, 3 * 2 * patch * patch),
                video_grid_thw=torch.tensor([[frames, side, side]]), **extra)


# Videos whose time positions run past the text after them (t > h/m for Qwen2-VL; Qwen2.5-VL's
# interval tokens_per_second x seconds > 1), where the decode positions must continue from the
# last prompt token, not from the largest position; Qwen3-VL with an image and split frames
VIDEOS = {
    "qwen2_vl long video": ("qwen2_vl", dict(frames=8, side=4)),
    "qwen2_5_vl 1.7 s per grid": ("qwen2_5_vl", dict(frames=4, side=4, image=True,
                                                     second_per_grid_ts=torch.tensor([1.7]))),
    "qwen2_5_vl seconds default": ("qwen2_5_vl", dict(frames=4, side=4)),
    "qwen2_5_vl bf16 seconds": ("qwen2_5_vl", dict(
        frames=4, side=4, second_per_grid_ts=torch.tensor([1.5], dtype=torch.bfloat16))),
    "qwen3_vl image + video": ("qwen3_vl", dict(frames=3, side=4, image=True, split=True,
                                                patch=16)),
}


@pytest.mark.parametrize("case", VIDEOS)
def test_video_generate_equals_hf(case):
    family, video = VIDEOS[case]
    hf, vk, _ = _build(family)
    assert_generate_equals_hf(hf, vk, _video(**video))


def test_llava_several_images_per_row_and_uint8():
    hf, _, inputs = _build("llava")
    ids = torch.tensor([[1] + [IMAGE_TOKEN] * 4 + [5] + [IMAGE_TOKEN] * 4 + [7]] * 2)
    pixels = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    mean, std, rescale = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28], 1 / 255
    normalized = (pixels * rescale - torch.tensor(mean)[:, None, None]) / torch.tensor(
        std)[:, None, None]
    vk = Llava.from_hf(hf, mean=mean, std=std, rescale=rescale)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=normalized).logits
        got = vk(ids, pixel_values=pixels).logits
        assert rel(vk(ids, pixel_values=pixels.float()).logits, expected) <= 1e-5  # raw floats
        plain = Llava.from_hf(hf)(ids, pixel_values=normalized).logits
    assert expected[0, 1:5].ne(expected[0, 6:10]).any()  # the two images of a row differ
    assert rel(got, expected) <= 1e-5 and rel(plain, expected) <= 1e-5
    with pytest.raises(ValueError, match="uint8 pixels need"):
        Llava.from_hf(hf)(ids, pixel_values=pixels)


@pytest.mark.parametrize("feature_layer", [-1, -2, -3])  # HF fails on 0
def test_internvl_feature_layers_and_uint8(feature_layer):
    """InternVL's -1 is the tower's last_hidden_state (after its final LayerNorm without mean
    pooling), other layers hidden_states[i]; two images in a row; raw uint8 pixels."""
    hf, _, _ = _build("internvl")
    hf.config.vision_feature_layer = feature_layer
    hf.config.vision_config.use_mean_pooling = False
    tower = T.InternVLVisionModel(hf.config.vision_config).eval()
    with torch.no_grad():
        for p in tower.parameters():  # HF's zero positions and CLS would hide their use
            p.add_(0.1 * torch.randn_like(p))
    hf.model.vision_tower = tower
    ids = torch.tensor([[1] + [IMAGE_TOKEN] * 4 + [5] + [IMAGE_TOKEN] * 4 + [7]] * 2)
    pixels = torch.randint(0, 256, (4, 3, 56, 56), dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    normalized = (pixels / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(
        std)[:, None, None]
    vk = InternVL.from_hf(hf, mean=mean, std=std, rescale=1 / 255)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=normalized).logits
        got = vk(ids, pixel_values=pixels).logits
        plain = InternVL.from_hf(hf)(ids, pixel_values=normalized).logits
        other = InternVL.from_hf(hf)(ids, pixel_values=normalized.flip(-1)).logits
    assert expected[0, 1:5].ne(expected[0, 6:10]).any()  # the two images of a row differ
    assert rel(other, expected) > 1e-3  # the image matters
    assert rel(got, expected) <= 1e-5 and rel(plain, expected) <= 1e-5


def test_internvl_bad_inputs():
    hf, vk, inputs = _build("internvl")
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    with pytest.raises(ValueError, match=r"square grid of patches divisible by 2.*\(4, 3\)"):
        vk(ids, pixel_values=pixels[..., :42])
    with pytest.raises(ValueError, match=r"square grid of patches divisible by 2.*\(3, 3\)"):
        vk(ids, pixel_values=pixels[..., :42, :42])
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, H, W\)"):
        vk(ids, pixel_values=pixels[0])
    with pytest.raises(RuntimeError, match="placeholders in input_ids"):
        vk(ids[:, :-3], pixel_values=pixels)
    with pytest.raises(TypeError, match="unexpected inputs"):
        vk(ids, pixel_values=pixels, image_sizes=None)
    with pytest.raises(ValueError, match="uint8 pixels need"):
        vk(ids, pixel_values=pixels.to(torch.uint8))
    parts = vk.vision_tower, vk.multi_modal_projector, vk.language_model, vk.lm_head
    with pytest.raises(ValueError, match="select_strategy must be 'default'"):
        InternVL(*parts, image_token_id=1, select_strategy="full")
    with pytest.raises(NotImplementedError, match="a list of layers"):
        InternVL(*parts, image_token_id=1, feature_layer=[-2, -1])
    for ratio in (0.75, 0.4, 2.0):  # HF's shuffle refuses them (int(1 / r) would not)
        with pytest.raises(ValueError, match="downsample_ratio must be 1 / an integer"):
            type(vk.multi_modal_projector)(32, 48, downsample_ratio=ratio)
    hf.config.model_type = "llava"
    with pytest.raises(NotImplementedError, match="only InternVL models"):
        InternVL.from_hf(hf)


@pytest.mark.parametrize("layers", [[-2, -1], [0, -2, 1]])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava_several_feature_layers(layers, strategy):
    """A list of feature layers: their states concatenated along the channels (CLS dropped from
    each with "default"), the projector taking n C_v, as HF's LLaVA."""
    _, _, inputs = _build("llava")
    hf = llava()[0]
    hf.config.vision_feature_layer, hf.config.vision_feature_select_strategy = layers, strategy
    hf = T.LlavaForConditionalGeneration(hf.config).eval()  # the projector's width follows
    ids = inputs["input_ids"] if strategy == "default" else torch.tensor(
        [[1, 5] + [IMAGE_TOKEN] * 5 + [7, 8]] * 2)
    vk = Llava.from_hf(hf)
    assert vk.multi_modal_projector.linear_1.in_features == 32 * len(layers)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
        got = vk(ids, pixel_values=inputs["pixel_values"]).logits
        swapped = Llava.from_hf(hf)
        swapped._layers = swapped._layers[::-1]  # the order of the concatenation matters
        other = swapped(ids, pixel_values=inputs["pixel_values"]).logits
    assert rel(got, expected) <= 1e-5 and rel(other, expected) > 1e-3


def test_generate_stops_at_eos():
    hf, vk, inputs = _build("llava")
    ids, s = inputs["input_ids"], inputs["input_ids"].shape[1]
    free = vk.generate(ids, 4, **_vk_inputs(inputs))[:, s:]
    # a token of row 0 (not its first) that row 1 has not produced by then: row 0 stops first
    stops = [j for j in range(1, 4) if int(free[0, j]) not in free[1, : j + 1].tolist()]
    assert stops, free
    eos = int(free[0, stops[0]])
    got = vk.generate(ids, 4, eos_token_id=eos, **_vk_inputs(inputs))[:, s:]
    first = [int((row == eos).nonzero()[0]) if (row == eos).any() else len(row) for row in free]
    assert got.shape[1] == min(4, max(first) + 1)  # stops once every row has produced it
    for row, stop in enumerate(first):  # the same tokens up to eos, then eos only
        assert torch.equal(got[row, : stop + 1], free[row, : stop + 1])
        assert (got[row, stop:] == eos).all()
    padded = vk.generate(ids, 4, eos_token_id=eos, pad_token_id=7, **_vk_inputs(inputs))[:, s:]
    assert any(padded.shape[1] > stop + 1 for stop in first)  # some row pads
    for row, stop in enumerate(first):  # HF's rule: eos once, then the pad token
        assert torch.equal(padded[row, : stop + 1], free[row, : stop + 1])
        assert (padded[row, stop + 1 :] == 7).all()
    expected = hf.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=eos,
                           pad_token_id=7)  # fmt: skip
    assert torch.equal(torch.cat([ids, padded], 1), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_hf(family):
    hf, vk, inputs = _build(family)
    hf.train()
    vk.train()
    pixels = inputs["pixel_values"].clone().requires_grad_()
    inputs = dict(inputs, pixel_values=pixels)
    weight = torch.randn(hf(**inputs).logits.shape)
    (hf(**inputs).logits * weight).sum().backward()
    expected_pixels = pixels.grad.clone()
    pixels.grad = None
    (vk(inputs["input_ids"], **_vk_inputs(inputs)).logits * weight).sum().backward()
    tower = vk.vision_tower if family in BUILDERS else vk.visual
    hf_tower = hf.model.vision_tower if family in BUILDERS else hf.model.visual
    expected = {n: p.grad for n, p in hf_tower.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in tower.named_parameters() if n in expected}
    assert expected and got.keys() == expected.keys()
    assert_grads_close(got, expected)
    assert rel(pixels.grad, expected_pixels) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_one_graph_without_host_reads(family):
    _, vk, inputs = _build(family)
    reads = prefill_host_reads(vk, inputs["input_ids"], _vk_inputs(inputs))
    # Qwen3-VL: HF's text model adds the DeepStack rows by a boolean mask (vlmkern's side has
    # no data-dependent size)
    assert not [r for r in reads if "_deepstack_process" not in r], reads


def test_bad_inputs():
    hf, vk, inputs = _build("llava")
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    with pytest.raises(RuntimeError, match="placeholders in input_ids"):
        vk(ids[:, :-3], pixel_values=pixels)
    with pytest.raises(TypeError, match="unexpected inputs"):
        vk(ids, pixel_values=pixels, image_grid_thw=None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        vk.generate(ids, 0, pixel_values=pixels)
    parts = vk.vision_tower, vk.multi_modal_projector, vk.language_model, vk.lm_head
    with pytest.raises(ValueError, match="select_strategy"):
        Llava(*parts, image_token_id=1, select_strategy="cls")
    for bad in ([], [-2, 1.0], 1.0, True, None):
        with pytest.raises(ValueError, match="feature_layer must be an int or a non-empty list"):
            Llava(*parts, image_token_id=1, feature_layer=bad)
    with pytest.raises(ValueError, match=r"feature_layer must be None or an int in \[-3, 2\]"):
        Llava(*parts, image_token_id=1, feature_layer=[-2, 3])(ids, pixel_values=pixels)
    with pytest.raises(NotImplementedError, match="no vision tower for HF's Linear"):
        vision_tower_from_hf(torch.nn.Linear(2, 2))
    for cls in (Llava, InternVL, QwenVL):  # the inner *Model given by mistake
        with pytest.raises(NotImplementedError, match=r"from_hf takes an HF \*ForConditional"):
            cls.from_hf(hf.model)
    hf.config.model_type = "llava_next"
    with pytest.raises(NotImplementedError, match="only LLaVA-1.5-style"):
        Llava.from_hf(hf)

    _, qwen, inputs = _build("qwen2_vl")
    ids, args = inputs["input_ids"], _vk_inputs(inputs)
    with pytest.raises(ValueError, match="image pixels given without image_grid_thw"):
        qwen(ids, pixel_values=inputs["pixel_values"])
    with pytest.raises(TypeError, match=r"unexpected inputs \['pixel_values_video'\]"):
        qwen(ids, pixel_values_video=inputs["pixel_values"], **args)
    cache = qwen(ids, use_cache=True, **args).past_key_values
    with pytest.raises(ValueError, match="rope_deltas"):
        qwen(ids[:, :1], past_key_values=cache)
    with pytest.raises(NotImplementedError, match="after the first turn"):
        qwen(ids, past_key_values=cache, rope_deltas=torch.zeros(3, 1, 1, dtype=torch.long),
             **args)
    with pytest.raises(ValueError, match="model must be one of"):
        QwenVL(qwen.visual, qwen.language_model, qwen.lm_head, model="qwen9", image_token_id=1,
               video_token_id=2)


def test_shares_the_language_model():
    hf, vk, _ = _build("llava")
    assert vk.language_model is hf.model.language_model and vk.lm_head is hf.lm_head
    copied = copy.deepcopy(vk)
    assert copied.vision_tower is not vk.vision_tower


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bf16_logits_follow_hf(family):
    """Vision head dim 64, so the towers run the CUDA attention kernels; vlmkern's side of the
    forward (features into the embeddings, positions) runs without a host sync."""
    hf32, vk32, inputs = _build(family, "cuda", vision_head_dim=64)

    def sync_free(vk16, ids, args):
        vk16.language_inputs(ids, **args)
        vk16.positions(ids, None, 0, None, args)

    assert_cuda_bf16_follows_hf(hf32, type(vk32).from_hf, inputs, sync_free)
