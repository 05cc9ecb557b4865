"""vlmkern.models.Idefics3 (Idefics3 and SmolVLM) vs HF's tiny models: tower, connector and logits
in fp32 and bf16, padded patches and padding images as HF handles them, uint8 pixels, gradients,
greedy generation (left-padded), one compiled graph without host reads, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from integrations.hf_models import (
    IMAGE_TOKEN,
    _idefics3,
    assert_copies_load_both_ways,
    assert_cuda_bf16_follows_hf,
    assert_grads_close,
    on,
    prefill_host_reads,
    rel,
)
from integrations.hf_models import vlmkern_calls as _calls
from projector_testing import assert_lowprec_tier

from vlmkern.models.idefics3 import Idefics3, Idefics3VisionTransformer

FAMILIES = ["idefics3", "smolvlm"]
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # the Idefics3 / SmolVLM processors'
T_IMG = 4  # features per 56 x 56 image: 4 x 4 patches of 14, pixel shuffle 2


def _row(images: int, length: int = 12) -> list[int]:
    """Text and ``images`` runs of T_IMG placeholders, padded with text to ``length``."""
    row = [1, 5]
    for i in range(images):
        row += ([7] if i else []) + [IMAGE_TOKEN] * T_IMG
    return row + [9] * (length - 1 - len(row)) + [8]


def _build(family: str, dtype: torch.dtype = torch.float32, **normalization):
    hf, _ = _idefics3(family)
    hf = hf.to(dtype).eval()
    return hf, Idefics3.from_hf(hf, **normalization).eval()


def _batch(pad_image: bool = True, mask: bool = True) -> dict:
    """Two rows: one image, then an all-zero padding image (the processor's batch of 1 + 2
    images; the padding image sits between real ones in the flattened order), and two images;
    a pixel mask with real pixels in the top-left 32 x 32 of image (1, 1): 3 x 3 of its 4 x 4
    patches of 14 are real (a patch with any real pixel is)."""
    pixels = torch.randn(2, 2, 3, 56, 56)
    ids = torch.tensor([_row(1 if pad_image else 2), _row(2)])
    inputs = {"input_ids": ids, "pixel_values": pixels}
    if pad_image:
        pixels[0, 1] = 0
    if mask:
        pixel_mask = torch.ones(2, 2, 56, 56, dtype=torch.long)
        pixel_mask[1, 1, 32:], pixel_mask[1, 1, :, 32:] = 0, 0
        pixels[1, 1, :, 32:], pixels[1, 1, :, :, 32:] = 0, 0
        if pad_image:
            pixel_mask[0, 1] = 0
        inputs["pixel_attention_mask"] = pixel_mask
    return inputs


def _vk_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["full", "all-ones mask", "padded patches and image"])
def test_logits_and_features_equal_hf(family, case, path):
    hf, vk = _build(family)
    inputs = _batch(pad_image=case.startswith("padded"), mask=case != "full")
    if case == "all-ones mask":
        inputs["pixel_attention_mask"].fill_(1)
    args = _vk_inputs(inputs)
    with torch.no_grad():
        expected = hf(**inputs).logits
        got = vk(inputs["input_ids"], **args).logits
        hf_feats = hf.model.get_image_features(**args).pooler_output
        feats = vk.vision_features(**args)[IMAGE_TOKEN]
    assert expected.abs().max() > 0 and got.shape == expected.shape
    assert rel(got, expected) <= 1e-5
    assert feats.shape == (sum(f.shape[0] for f in hf_feats), 48)
    assert rel(feats, torch.cat(hf_feats)) <= 1e-5
    # each image's features reach its own placeholders (a shuffled order would not pass)
    assert expected[1, 2:6].sub(expected[1, 7:11]).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_and_connector_equal_hf(family, path):
    hf, vk = _build(family)
    pixels = torch.randn(3, 3, 56, 56)
    patches = torch.ones(3, 4, 4, dtype=torch.bool)
    patches[1, 2:], patches[2, :, 1:] = False, False  # 2 x 4 and 4 x 1 real patches
    with torch.no_grad():
        for mask in (None, patches):
            want = hf.model.vision_model(pixels, patch_attention_mask=mask).last_hidden_state
            got = vk.vision_model(pixels, mask)
            assert want.abs().max() > 0 and rel(got, want) <= 1e-5
        want_c = hf.model.connector(want)
        got_c = vk.connector(want)
    assert got_c.shape == (3, T_IMG, 48) and want_c.abs().max() > 0
    assert rel(got_c, want_c) <= 1e-5


def test_full_grid_positions_follow_hfs_buckets():
    """A 19 x 19 table, where HF's float32 buckets of a full grid are not 0..18 (row 12 -> 11):
    the fused path gathers HF's rows; a padded 7 x 11 image takes its bucketized rows."""
    cfg = T.Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, image_size=38, patch_size=2)
    hf = T.Idefics3VisionTransformer(cfg).eval()
    ours = Idefics3VisionTransformer.from_hf(hf)
    pixels = torch.randn(2, 3, 38, 38)
    patches = torch.ones(2, 19, 19, dtype=torch.bool)
    patches[1, 7:], patches[1, :, 11:] = False, False
    ids = ours.embeddings.position_ids(patches)
    assert ids[0].view(19, 19)[:, 0].tolist() != list(range(0, 361, 19))
    with torch.no_grad():
        for mask in (None, patches):
            want = hf(pixels, patch_attention_mask=mask).last_hidden_state
            assert rel(ours(pixels, mask), want) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_all_padding_images_as_hf(family):
    """Every image all zero: SmolVLM keeps the first one, whose placeholders then take its
    features; Idefics3 drops them all, which HF's tower cannot run (0 images): vlmkern gives
    the text-only prompt's logits."""
    hf, vk = _build(family)
    smol = family == "smolvlm"
    ids = torch.tensor([_row(1 if smol else 0)])
    pixels = torch.zeros(1, 2, 3, 56, 56)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels if smol else None).logits
        got = vk(ids, pixel_values=pixels).logits
        if not smol:
            with pytest.raises(RuntimeError, match="0 elements"):
                hf(input_ids=ids, pixel_values=pixels)
        feats = vk.vision_features(pixel_values=pixels)[IMAGE_TOKEN]
    assert feats.shape[0] == (T_IMG if family == "smolvlm" else 0)
    assert expected.abs().max() > 0 and rel(got, expected) <= 1e-5


def test_padding_images_reach_the_tower_unmasked():
    """Their pixel mask is all 0, but no row of theirs may see no key (a NaN there on some
    CUDA backend would reach the gradients): the tower gets them with every patch real."""
    _, vk = _build("idefics3")
    seen = []
    vk.vision_model.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    with torch.no_grad():
        vk.vision_features(**_vk_inputs(_batch()))
    patches = seen[0].view(2, 2, 4, 4)
    assert patches[0, 1].all() and not patches[1, 1].all() and patches[0, 0].all()


def test_padding_is_judged_in_the_models_dtype():
    """HF casts the pixels to the model's dtype before looking for all-zero images: values
    that round to 0 in bf16 make a padding image."""
    hf, vk = _build("smolvlm", torch.bfloat16)
    inputs = _batch(mask=False)
    inputs["pixel_values"][0, 1] = 1e-42  # a float32 subnormal, 0 in bf16
    with torch.no_grad():
        want = torch.cat(hf.model.get_image_features(inputs["pixel_values"]).pooler_output)
        feats = vk.vision_features(pixel_values=inputs["pixel_values"])[IMAGE_TOKEN]
        logits = vk(inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    assert feats.shape == want.shape == (3 * T_IMG, 48) and logits.isfinite().all()


@pytest.mark.parametrize("family", FAMILIES)
def test_uint8_pixels_equal_normalized_floats(family):
    hf, vk = _build(family, mean=MEAN, std=STD, rescale=1 / 255)
    inputs = _batch()
    raw = torch.randint(1, 256, (2, 2, 3, 56, 56), dtype=torch.uint8)
    raw[0, 1] = 0  # the padding image (its mask all zero)
    raw[1, 0] = 0  # a black image: real (its mask is not 0; -1 everywhere after normalizing)
    norm = (raw / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    norm[0, 1] = 0  # as the processor pads
    mask = inputs["pixel_attention_mask"]
    ids = inputs["input_ids"]
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=norm, pixel_attention_mask=mask).logits
        got = vk(ids, pixel_values=raw, pixel_attention_mask=mask).logits
        raw_floats = vk(ids, pixel_values=raw.float(), pixel_attention_mask=mask).logits
        plain = Idefics3.from_hf(hf)(ids, pixel_values=norm, pixel_attention_mask=mask).logits
    assert expected.abs().max() > 0
    for out in (got, raw_floats, plain):
        assert rel(out, expected) <= 1e-5
    with pytest.raises(ValueError, match="uint8 pixels need"):
        Idefics3.from_hf(hf)(ids, pixel_values=raw)
    # raw pixels without a mask: every image is real (the black padding image too)
    ids2 = torch.tensor([_row(2)] * 2)
    with torch.no_grad():
        expected = hf(input_ids=ids2, pixel_values=(raw / 255 - 0.5) / 0.5).logits
        got = vk(ids2, pixel_values=raw).logits
    assert rel(got, expected) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_equal_hf(family, masked):
    hf, vk = _build(family)
    hf.train()
    vk.train()
    inputs = _batch(mask=masked)
    pixels = inputs["pixel_values"].clone().requires_grad_()
    inputs = dict(inputs, pixel_values=pixels)
    weight = torch.randn(inputs["input_ids"].shape + (160,))
    (hf(**inputs).logits * weight).sum().backward()
    expected_pixels = pixels.grad.clone()
    pixels.grad = None
    (vk(inputs["input_ids"], **_vk_inputs(inputs)).logits * weight).sum().backward()
    for ours, theirs in ((vk.vision_model, hf.model.vision_model),
                         (vk.connector, hf.model.connector)):
        expected = {n: p.grad for n, p in theirs.named_parameters()}
        got = {n: p.grad for n, p in ours.named_parameters()}
        assert all(g is not None for g in expected.values())
        assert_grads_close(got, expected)
    assert expected_pixels[1].abs().max() > 0 and (expected_pixels[0, 1] == 0).all()
    assert rel(pixels.grad, expected_pixels) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_within_twice_hfs_error(family):
    """G3(b): logits and tower output vs HF in float64, within 2x HF's own bf16 error."""
    hf, _ = _build(family)
    inputs = _batch()
    args = _vk_inputs(inputs)
    pixels = inputs["pixel_values"][0]
    with torch.no_grad():
        hf64 = copy.deepcopy(hf).double()
        ref = {"logits": hf64(**on(inputs, dtype=torch.float64)).logits,
               "tower": hf64.model.vision_model(pixels.double()).last_hidden_state}
        hf16 = copy.deepcopy(hf).bfloat16()
        vk16 = Idefics3.from_hf(hf16)
        pt = {"logits": hf16(**on(inputs, dtype=torch.bfloat16)).logits,
              "tower": hf16.model.vision_model(pixels.bfloat16()).last_hidden_state}
        got = {"logits": vk16(inputs["input_ids"], **args).logits,
               "tower": vk16.vision_model(pixels)}
    for key, r in ref.items():
        assert r.abs().max() > 0 and got[key].dtype == torch.bfloat16
        assert rel(got[key], r) > 1e-4  # bf16 really ran
        assert_lowprec_tier(got[key], pt[key], r, what=key)


def _left_padded(inputs: dict) -> dict:
    """The two rows after two more text tokens / two masked pad tokens."""
    ids = inputs["input_ids"]
    ids = torch.cat([torch.tensor([[5, 6], [0, 0]]), ids], 1)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return dict(inputs, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_generate_equals_hf(family, padded):
    """Greedy tokens equal HF's generate and so do the logits of every step (1e-5 of their
    max); the batch has a padding image and padded patches."""
    hf, vk = _build(family)
    inputs = _left_padded(_batch()) if padded else _batch()
    hf.generation_config.pad_token_id = 0
    expected = hf.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=None,
                           output_logits=True, return_dict_in_generate=True)
    got, logits = vk.generate(inputs["input_ids"], 5, attention_mask=inputs.get("attention_mask"),
                              output_logits=True, **_vk_inputs(inputs))
    assert torch.equal(got, expected.sequences), (got, expected.sequences)
    assert rel(logits, torch.stack(expected.logits, 1)) <= 1e-5


def test_vlmkern_ops_run():
    _, vk = _build("idefics3")
    full = _batch(mask=False)
    with torch.no_grad():
        calls = _calls(lambda: vk(full["input_ids"], **_vk_inputs(full)))
    assert {"patch_embed", "mlp_projector"} <= set(calls), calls
    assert calls["mlp_projector"] == 1 + 2  # the connector, each layer's MLP (all images at once)


def test_compile_one_graph_without_host_reads():
    """Padding image, padded patches: the prefill is one graph with no host read (HF's own
    forward drops the padding image by a boolean index)."""
    _, vk = _build("idefics3")
    inputs = _batch()
    reads = prefill_host_reads(vk, inputs["input_ids"], _vk_inputs(inputs))
    assert not reads, reads


def test_state_dicts_load_both_ways_and_the_llm_is_shared():
    hf, vk = _build("smolvlm")
    assert_copies_load_both_ways([(vk.vision_model, hf.model.vision_model),
                                  (vk.connector, hf.model.connector)])
    assert vk.language_model is hf.model.text_model and vk.lm_head is hf.lm_head
    assert not vk.vision_model.training and Idefics3.from_hf(hf.train()).vision_model.training


def test_bad_inputs():
    hf, vk = _build("idefics3")
    inputs = _batch()
    ids, pixels, mask = (inputs[k] for k in ("input_ids", "pixel_values", "pixel_attention_mask"))
    with pytest.raises(RuntimeError, match="placeholders in input_ids must equal"):
        vk(ids[:, :-3], pixel_values=pixels)  # row 1 loses two placeholders
    with pytest.raises(RuntimeError, match="placeholders in input_ids must equal"):
        vk(ids, pixel_values=torch.randn(2, 2, 3, 56, 56))  # the padding image made real
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, N_images, 3, H, W\)"):
        vk(ids, pixel_values=pixels[0])
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, N_images, 3, H, W\)"):
        vk(ids, pixel_values=pixels[:, :, :2])
    with pytest.raises(ValueError, match="patch grid must be square"):
        vk(ids, pixel_values=pixels[..., :42])
    with pytest.raises(ValueError, match="patch grid must be square"):
        vk(ids, pixel_values=torch.randn(2, 2, 3, 42, 42))  # 3 x 3 patches, shuffle 2
    with pytest.raises(ValueError, match=r"pixel_attention_mask must be \(B, N_images, H, W\)"):
        vk(ids, pixel_values=pixels, pixel_attention_mask=mask[:, 0])
    with pytest.raises(TypeError, match=r"unexpected inputs \['image_grid_thw'\]"):
        vk(ids, pixel_values=pixels, image_grid_thw=None)
    with pytest.raises(TypeError, match="unexpected inputs"):
        vk.vision_features(pixel_values=pixels, pixel_mask=mask)
    tower = vk.vision_model
    with pytest.raises(ValueError, match=r"patch_attention_mask must be bool \(2, 4, 4\)"):
        tower(pixels[0], torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, H, W\)"):
        tower(pixels)
    with pytest.raises(ValueError, match="model_type must be one of"):
        Idefics3(tower, vk.connector, vk.language_model, vk.lm_head, image_token_id=1,
                 model_type="idefics2")
    with pytest.raises(NotImplementedError, match="is not one of Idefics3VisionTransformer"):
        Idefics3VisionTransformer.from_hf(torch.nn.Linear(2, 2))
    hf.config.model_type = "idefics2"
    with pytest.raises(NotImplementedError, match="only Idefics3 / SmolVLM ForConditional"):
        Idefics3.from_hf(hf)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bf16_logits_follow_hf(family):
    """Vision head dim 64 (the CUDA attention kernel's): bf16 logits within 2x HF's error vs
    HF in fp32; vlmkern's side of the prefill (padding image, padded patches) without a host
    sync."""
    small, _ = _idefics3(family)
    cfg = small.config
    cfg.vision_config.hidden_size, cfg.vision_config.intermediate_size = 256, 512
    hf32 = type(small)(cfg).to("cuda").eval()

    def sync_free(vk16, ids, args):
        vk16.language_inputs(ids, **args)
        vk16.language_inputs(ids, pixel_values=args["pixel_values"])  # unmasked: fused

    assert_cuda_bf16_follows_hf(hf32, Idefics3.from_hf, on(_batch(), "cuda"), sync_free)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("patch, side, scale", [(16, 48, 3), (14, 58, 2)])
def test_other_geometries_equal_hf(family, patch, side, scale):
    """SmolVLM's patch 16 with a 3x3 shuffle, and a size the patch does not divide (cropped)."""
    config = T.Idefics3Config if family == "idefics3" else T.SmolVLMConfig
    model = (T.Idefics3ForConditionalGeneration if family == "idefics3"
             else T.SmolVLMForConditionalGeneration)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=side, patch_size=patch)
    text = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=160, model_type="llama")
    hf = model(config(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                      scale_factor=scale)).eval()
    per_image = (side // patch) ** 2 // scale**2
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * 2 * per_image + [7, 8]])
    pixels = torch.randn(1, 2, 3, side, side)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels).logits
        got = Idefics3.from_hf(hf)(ids, pixel_values=pixels).logits
    assert rel(got, expected) <= 1e-5
