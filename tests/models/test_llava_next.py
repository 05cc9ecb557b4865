"""vlmkern.models.LlavaNext (LLaVA-NeXT and LLaVA-OneVision) vs HF's tiny models: features and
logits with images of different sizes (different grids and crops) in one batch, OneVision's
shrinking, base-tile-only images and videos, uint8 pixels, gradients, bf16, greedy generation
(left-padded), one compiled graph given the sizes as lists, the grid arithmetic, bad inputs."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import transformers as T
from integrations.hf_models import (
    _LLAMA,
    _VIT,
    IMAGE_TOKEN,
    assert_cuda_bf16_follows_hf,
    assert_generate_equals_hf,
    assert_grads_close,
    on,
    prefill_host_reads,
    rel,
)
from integrations.hf_models import vlmkern_calls as _calls
from projector_testing import assert_lowprec_tier
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

from vlmkern.models.llava_next import LlavaNext, best_resolution, unpad_box

FAMILIES = ["llava_next", "llava_onevision"]
VIDEO_TOKEN = 152
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
# Tiles of 28 pixels, 7-pixel patches: 4 x 4 features per tile
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
# (height, width): grids 1x3 (columns cropped), 3x1 (rows cropped), 2x2 (uncropped), 2x2 (an odd
# margin: 5 rows' worth cropped to 6 as HF does), 1x2 (uncropped); OneVision (anyres_max_2)
# shrinks all but the last
SIZES = [[30, 70], [90, 40], [50, 50], [40, 64], [30, 60]]
# The images of each row; OneVision's second row has two (their base tiles only) and its last
# row a video
ROWS = {"llava_next": [[0, 1], [2], [3, 4]], "llava_onevision": [[0], [1, 2], [3], [4], []]}


def _hf(family: str, vision_head_dim: int = 8) -> torch.nn.Module:
    """``vision_head_dim``: the tower's (4 heads); 64 reaches the CUDA attention kernels."""
    vit = dict(_VIT, hidden_size=4 * vision_head_dim)
    if family == "llava_next":
        vc = T.CLIPVisionConfig(**vit, image_size=28, patch_size=7)
        cfg = T.LlavaNextConfig(vision_config=vc, text_config=T.LlamaConfig(**_LLAMA),
                                image_token_id=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS[1:])
        return T.LlavaNextForConditionalGeneration(cfg).eval()
    vc = dict(vit, model_type="siglip_vision_model", image_size=28, patch_size=7,
              vision_use_head=False)
    cfg = T.LlavaOnevisionConfig(vision_config=vc, text_config=dict(_LLAMA, model_type="qwen2"),
                                 image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                                 image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_2")
    return T.LlavaOnevisionForConditionalGeneration(cfg).eval()


def _build(family: str, **normalization):
    hf = _hf(family)
    return hf, LlavaNext.from_hf(hf, **normalization).eval()


def _tiles(sizes: list[list[int]], pinpoints: list[list[int]]) -> list[int]:
    """Each image's tile count as HF's processor makes it (the base tile + the grid)."""
    return [1 + (h // 28) * (w // 28) for h, w in (select_best_resolution(s, pinpoints)
                                                   for s in sizes)]


def _vision(family: str) -> dict:
    """The images (padded to the most tiles) and, for OneVision, the images per row and a
    3-frame video."""
    counts = _tiles(SIZES, PINPOINTS[family == "llava_next":])
    pixels = torch.randn(len(SIZES), max(counts), 3, 28, 28)
    for i, n in enumerate(counts):
        pixels[i, n:] = 0  # as the processor pads
    vision = dict(pixel_values=pixels, image_sizes=torch.tensor(SIZES))
    if family == "llava_onevision":
        vision.update(batch_num_images=torch.tensor([len(r) for r in ROWS[family]]),
                      pixel_values_videos=torch.randn(1, 3, 3, 28, 28))
    return vision


def _batch(hf, family: str, left_pad: bool = False) -> dict:
    """Prompts with as many placeholders as HF's own features have rows, images as ROWS puts
    them. Shorter rows are filled with text, or with masked pad tokens on the left
    (``left_pad``)."""
    vision = _vision(family)
    args = {k: v for k, v in vision.items() if k != "pixel_values_videos"}
    with torch.no_grad():
        lengths = [f.shape[0] for f in hf.model.get_image_features(**args).pooler_output]
    per_row = []
    for images in ROWS[family]:
        row = [VIDEO_TOKEN] * (3 * 4 + 1) if not images else []  # 3 frames of 2 x 2, newline
        for i in images:
            row += ([9] if row else []) + [IMAGE_TOKEN] * lengths[i]
        per_row.append(row)
    rows = [[1, 5, *r, 7, 8] for r in per_row]
    longest = max(map(len, rows))
    ids, mask = [], []
    for r in rows:
        pad = longest - len(r)
        ids.append([0] * pad + r if left_pad else r[:-1] + [6] * pad + r[-1:])
        mask.append([0] * pad + [1] * len(r) if left_pad else [1] * longest)
    return dict(vision, input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))


def _vk_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_features_equal_hf(family):
    hf, vk = _build(family)
    inputs = _batch(hf, family)
    args = _vk_inputs(inputs)
    images = {k: v for k, v in args.items() if k != "pixel_values_videos"}
    with torch.no_grad():
        expected = hf(**inputs).logits
        got = vk(inputs["input_ids"], attention_mask=inputs["attention_mask"], **args).logits
        hf_feats = hf.model.get_image_features(**images).pooler_output
        feats = vk.vision_features(**args)
        other = vk(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   **dict(args, pixel_values=args["pixel_values"].flip(-1))).logits
    assert expected.abs().max() > 0 and got.shape == expected.shape
    assert rel(got, expected) <= 1e-5 and rel(other, expected) > 1e-3  # the pixels matter
    assert len({f.shape[0] for f in hf_feats}) >= 3  # grids and crops differ per image
    assert rel(feats[IMAGE_TOKEN], torch.cat(hf_feats)) <= 1e-5
    if family == "llava_onevision":
        with torch.no_grad():
            hf_video = hf.model.get_video_features(args["pixel_values_videos"]).pooler_output
        assert rel(feats[VIDEO_TOKEN], hf_video.flatten(0, 1)) <= 1e-5
        # 4 x 10 shrunk to 3 x 8, base tiles only, 6 x 8 shrunk to 4 x 6, 4 x 8 kept
        assert [f.shape[0] for f in hf_feats] == [16 + 3 * 9, 17, 17, 16 + 4 * 7, 16 + 4 * 9]


def test_onevision_without_batch_num_images_tiles_every_image():
    """HF's default (every image any-res), and a larger anyres_max that shrinks nothing."""
    hf, _ = _build("llava_onevision")
    vision = {k: v for k, v in _vision("llava_onevision").items()
              if k in ("pixel_values", "image_sizes")}
    for ratio in ("anyres_max_2", "anyres_max_9"):
        hf.config.vision_aspect_ratio = ratio
        vk = LlavaNext.from_hf(hf)
        with torch.no_grad():
            want = hf.model.get_image_features(**vision).pooler_output
            got = vk.vision_features(**vision)[IMAGE_TOKEN]
        assert rel(got, torch.cat(want)) <= 1e-5


@pytest.mark.parametrize("layers", [-1, [-3, -1]])
def test_next_feature_layers(layers):
    """One layer other than -2, and two layers concatenated along the channels."""
    hf = _hf("llava_next")
    hf.config.vision_feature_layer = layers
    hf = T.LlavaNextForConditionalGeneration(hf.config).eval()  # the projector's width follows
    vk = LlavaNext.from_hf(hf)
    vision = _vision("llava_next")
    with torch.no_grad():
        want = hf.model.get_image_features(**vision).pooler_output
        got = vk.vision_features(**vision)[IMAGE_TOKEN]
    assert rel(got, torch.cat(want)) <= 1e-5


def test_stacked_tiles_and_list_sizes():
    """Tiles already stacked (Σ n, C, H, W), image_sizes as a list (of lists or of tensors)
    give the same rows."""
    hf, vk = _build("llava_next")
    vision = _vision("llava_next")
    counts = _tiles(SIZES, PINPOINTS[1:])
    stacked = torch.cat([p[:n] for p, n in zip(vision["pixel_values"], counts, strict=True)])
    with torch.no_grad():
        want = vk.vision_features(**vision)[IMAGE_TOKEN]
        got = vk.vision_features(pixel_values=stacked, image_sizes=SIZES)[IMAGE_TOKEN]
        rows = [torch.tensor(s) for s in SIZES]
        assert torch.equal(vk.vision_features(**dict(vision, image_sizes=rows))[IMAGE_TOKEN],
                           want)
        hf_got = hf.model.get_image_features(stacked, vision["image_sizes"]).pooler_output
    assert torch.equal(got, want) and rel(got, torch.cat(hf_got)) <= 1e-5


def test_grid_arithmetic_equals_hf():
    """best_resolution and unpad_box against HF's functions over random image sizes."""
    rng = random.Random(0)
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    cropped = set()
    # first two where the kept size in float is just below an integer (HF rounds it to 7 places)
    sizes = [(55, 176), (88, 99)] + [(rng.randint(1, 2000), rng.randint(1, 2000))
                                     for _ in range(2000)]
    for height, width in sizes:
        h, w = best_resolution(height, width, pinpoints)
        assert (h, w) == select_best_resolution((height, width), pinpoints)
        rows, cols = h // 14, w // 14
        top, bottom, left, right = unpad_box(rows, cols, height, width)
        want = unpad_image(torch.arange(rows * cols).view(1, rows, cols), [height, width])
        assert torch.equal(torch.arange(rows * cols).view(rows, cols)[top:bottom, left:right],
                           want[0])
        cropped.add((top, left))
    assert (0, 0) in cropped and len(cropped) > 20  # uncropped, and many row and column crops
    assert {t > 0 for t, _ in cropped} == {x > 0 for _, x in cropped} == {False, True}


@pytest.mark.parametrize("family", FAMILIES)
def test_uint8_pixels_with_mean_std(family):
    hf, vk = _build(family, mean=MEAN, std=STD, rescale=1 / 255)
    inputs = _batch(hf, family)
    shift, scale = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    raw = {k: torch.randint(0, 256, inputs[k].shape, dtype=torch.uint8)
           for k in ("pixel_values", "pixel_values_videos") if k in inputs}
    normalized = {k: (v / 255 - shift) / scale for k, v in raw.items()}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        expected = hf(**dict(inputs, **normalized)).logits
        got = vk(ids, attention_mask=mask, **dict(_vk_inputs(inputs), **raw)).logits
        floats = {k: v.float() for k, v in raw.items()}
        raw_floats = vk(ids, attention_mask=mask, **dict(_vk_inputs(inputs), **floats)).logits
        plain = LlavaNext.from_hf(hf)(ids, attention_mask=mask,
                                      **dict(_vk_inputs(inputs), **normalized)).logits
    assert expected.abs().max() > 0
    for out in (got, raw_floats, plain):
        assert rel(out, expected) <= 1e-5
    with pytest.raises(ValueError, match="uint8 pixels need"):
        LlavaNext.from_hf(hf)(ids, **dict(_vk_inputs(inputs), **raw))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_hf(family):
    """Tower, projector, image_newline and pixels (padding tiles get none) as HF's."""
    hf, vk = _build(family)
    hf.train()
    vk.train()
    inputs = _batch(hf, family)
    grads = [k for k in ("pixel_values", "pixel_values_videos") if k in inputs]
    leaves = {k: inputs[k].clone().requires_grad_() for k in grads}
    inputs = dict(inputs, **leaves)
    weight = torch.randn(inputs["input_ids"].shape + (160,))
    (hf(**inputs).logits * weight).sum().backward()
    expected_pixels = {k: v.grad.clone() for k, v in leaves.items()}
    for v in leaves.values():
        v.grad = None
    out = vk(inputs["input_ids"], attention_mask=inputs["attention_mask"], **_vk_inputs(inputs))
    (out.logits * weight).sum().backward()
    hf_tower = getattr(hf.model.vision_tower, "vision_model", hf.model.vision_tower)
    for ours, theirs in ((vk.vision_tower, hf_tower),
                         (vk.multi_modal_projector, hf.model.multi_modal_projector)):
        expected = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
        got = {n: p.grad for n, p in ours.named_parameters() if n in expected}
        assert expected and got.keys() == expected.keys()
        assert_grads_close(got, expected)
    newline = hf.model.image_newline.grad
    assert newline.abs().max() > 0 and rel(vk.image_newline.grad, newline) <= 1e-4
    counts = _tiles(SIZES, PINPOINTS[family == "llava_next":])
    for k, v in leaves.items():
        assert expected_pixels[k].abs().max() > 0
        assert rel(v.grad, expected_pixels[k]) <= 1e-4
    pixel_grad = leaves["pixel_values"].grad
    assert (pixel_grad[0, counts[0]:] == 0).all() and pixel_grad[0, :counts[0]].abs().max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_within_twice_hfs_error(family):
    """G3(b): logits and image features vs HF in float64, within 2x HF's own bf16 error."""
    hf, _ = _build(family)
    inputs = _batch(hf, family)
    images = {k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images")
              if k in inputs}
    with torch.no_grad():
        hf64 = copy.deepcopy(hf).double()
        ref = {"logits": hf64(**on(inputs, dtype=torch.float64)).logits,
               "features": torch.cat(hf64.model.get_image_features(
                   **on(images, dtype=torch.float64)).pooler_output)}
        hf16 = copy.deepcopy(hf).bfloat16()
        vk16 = LlavaNext.from_hf(hf16)
        pt = {"logits": hf16(**on(inputs, dtype=torch.bfloat16)).logits,
              "features": torch.cat(hf16.model.get_image_features(
                  **on(images, dtype=torch.bfloat16)).pooler_output)}
        got = {"logits": vk16(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              **_vk_inputs(inputs)).logits,
               "features": vk16.vision_features(**images)[IMAGE_TOKEN]}
    for key, r in ref.items():
        assert r.abs().max() > 0 and got[key].dtype == torch.bfloat16
        assert rel(got[key], r) > 1e-4  # bf16 really ran
        assert_lowprec_tier(got[key], pt[key], r, what=key)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_generate_equals_hf(family, padded):
    """Greedy tokens equal HF's generate and so do the logits of every step (1e-5 of their
    max: a wrong decode position shows there before it flips a token)."""
    hf, vk = _build(family)
    assert_generate_equals_hf(hf, vk, _batch(hf, family, left_pad=padded), steps=5)


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_one_graph_without_host_reads_given_list_sizes(family):
    """image_sizes and batch_num_images as Python lists: nothing is read on the host."""
    hf, vk = _build(family)
    inputs = _batch(hf, family)
    args = {k: v.tolist() if k in ("image_sizes", "batch_num_images") else v
            for k, v in _vk_inputs(inputs).items()}

    args["attention_mask"] = inputs["attention_mask"]
    reads = prefill_host_reads(vk, inputs["input_ids"], args)
    with torch.no_grad():
        got, expected = vk(inputs["input_ids"], **args).logits, hf(**inputs).logits
    assert not reads, reads
    assert rel(got, expected) <= 1e-5


def test_compiled_features_follow_new_image_sizes():
    """Sizes that change between calls of a fullgraph-compiled function come in as symbolic
    ints: they are made constants (a recompile per size), not a trace error."""
    _, vk = _build("llava_next")

    def features(pixels, sizes):
        return vk.vision_features(pixel_values=pixels, image_sizes=sizes)[IMAGE_TOKEN]

    torch._dynamo.reset()
    compiled = torch.compile(features, fullgraph=True, backend="eager")
    for size in ([30, 70], [90, 40], [50, 50], [40, 64]):
        pixels = torch.randn(1, _tiles([size], PINPOINTS[1:])[0], 3, 28, 28)
        with torch.no_grad():
            assert rel(compiled(pixels, [size]), features(pixels, [size])) <= 1e-6


def test_vlmkern_ops_run_and_the_llm_is_shared():
    hf, vk = _build("llava_next")
    inputs = _batch(hf, "llava_next")
    with torch.no_grad():
        calls = _calls(lambda: vk(inputs["input_ids"], **_vk_inputs(inputs)))
    assert {"patch_embed", "mlp_projector"} <= set(calls), calls
    assert vk.language_model is hf.model.language_model and vk.lm_head is hf.lm_head
    assert torch.equal(vk.image_newline, hf.model.image_newline)
    assert vk.image_newline.data_ptr() != hf.model.image_newline.data_ptr()
    empty = {k: inputs[k][:0] for k in ("pixel_values", "image_sizes")}
    assert vk.vision_features(**empty) == {}  # no image, as HF skips an empty batch


def test_bad_inputs():
    hf, vk = _build("llava_next")
    inputs = _batch(hf, "llava_next")
    ids, pixels, sizes = (inputs[k] for k in ("input_ids", "pixel_values", "image_sizes"))
    with pytest.raises(ValueError, match="pixel_values given without image_sizes"):
        vk(ids, pixel_values=pixels)
    with pytest.raises(ValueError, match=r"must hold 5 images \(the rows of image_sizes\)"):
        vk(ids, pixel_values=pixels[:3], image_sizes=sizes)
    with pytest.raises(ValueError, match=r"of up to 5 tiles \(the images' tile counts "
                                         r"\[4, 4, 5, 5, 3\]\)"):
        vk(ids, pixel_values=pixels[:, :4], image_sizes=sizes)
    with pytest.raises(ValueError, match=r"stacked pixel_values \(4, 3, 28, 28\) must hold 21"):
        vk(ids, pixel_values=pixels[0, :4], image_sizes=sizes)
    with pytest.raises(ValueError, match=r"pixel_values must be \(N_images, N_tiles, C, H, W\)"):
        vk(ids, pixel_values=pixels[None], image_sizes=sizes)
    with pytest.raises(ValueError, match=r"image_sizes must be \(N_images, 2\) positive"):
        vk(ids, pixel_values=pixels, image_sizes=sizes[:, :1])
    with pytest.raises(ValueError, match=r"image_sizes must be \(N_images, 2\) positive"):
        vk(ids, pixel_values=pixels, image_sizes=sizes * torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"image_sizes must be \(N_images, 2\) positive"):
        vk(ids, pixel_values=pixels, image_sizes=sizes[0])
    with pytest.raises(RuntimeError, match="placeholders in input_ids"):
        vk(ids[:, :-3], pixel_values=pixels, image_sizes=sizes)
    with pytest.raises(TypeError, match=r"unexpected inputs \['batch_num_images'\]"):
        vk(ids, pixel_values=pixels, image_sizes=sizes, batch_num_images=None)
    with pytest.raises(TypeError, match=r"unexpected inputs \['image_grid_thw'\]"):
        vk.vision_features(pixel_values=pixels, image_sizes=sizes, image_grid_thw=None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        vk.generate(ids, 0, pixel_values=pixels, image_sizes=sizes)
    parts = (vk.vision_tower, vk.multi_modal_projector, vk.language_model, vk.lm_head,
             vk.image_newline)
    grid = dict(image_token_id=1, image_grid_pinpoints=PINPOINTS)
    for bad in ([], [[28, 42]], [[28]], [[0, 28]], [28, 56], [[28, 56.0]]):
        with pytest.raises(ValueError, match="positive multiples of the tower's image size 28"):
            LlavaNext(*parts, image_token_id=1, image_grid_pinpoints=bad)
    with pytest.raises(ValueError, match="model_type must be one of"):
        LlavaNext(*parts, **grid, model_type="llava")
    with pytest.raises(ValueError, match="video_token_id is LLaVA-OneVision's"):
        LlavaNext(*parts, **grid, video_token_id=2)
    for bad in ("anyres", "anyres_max_0", "anyres_max_9x"):
        with pytest.raises(ValueError, match="vision_aspect_ratio must be 'anyres_max_N'"):
            LlavaNext(*parts, **grid, model_type="llava_onevision", vision_aspect_ratio=bad)
    with pytest.raises(ValueError, match="select_strategy"):
        LlavaNext(*parts, **grid, select_strategy="cls")
    with pytest.raises(ValueError, match="a tile gives 17 features, not the 4 x 4 grid"):
        LlavaNext(*parts, **grid, select_strategy="full")(ids, pixel_values=pixels,
                                                          image_sizes=sizes)
    with pytest.raises(NotImplementedError, match="only model_type 'llava_next' or"):
        LlavaNext.from_hf(T.LlavaForConditionalGeneration(T.LlavaConfig(
            vision_config=T.CLIPVisionConfig(**_VIT), text_config=T.LlamaConfig(**_LLAMA))))

    hf, ov = _build("llava_onevision")
    inputs = _batch(hf, "llava_onevision")
    ids, args = inputs["input_ids"], _vk_inputs(inputs)
    with pytest.raises(ValueError, match=r"batch_num_images \[1, 2\] must add up to the number "
                                         r"of images in image_sizes \(5\)"):
        ov(ids, **dict(args, batch_num_images=torch.tensor([1, 2])))
    with pytest.raises(ValueError, match=r"pixel_values_videos must be \(B, frames, C, H, W\)"):
        ov(ids, **dict(args, pixel_values_videos=args["pixel_values_videos"][0]))
    with pytest.raises(TypeError, match=r"unexpected inputs \['image_sizes_videos'\]"):
        ov(ids, **args, image_sizes_videos=None)
    parts = (ov.vision_tower, ov.multi_modal_projector, ov.language_model, ov.lm_head,
             ov.image_newline)
    no_video = LlavaNext(*parts, **grid, model_type="llava_onevision", select_strategy="full",
                         feature_layer=-1)
    with pytest.raises(ValueError, match="pixel_values_videos given but no video_token_id"):
        no_video(ids, **args)
    with pytest.raises(ValueError, match="a tile gives 15 features, not the 4 x 4 grid"):
        LlavaNext(*parts, **grid, model_type="llava_onevision", video_token_id=VIDEO_TOKEN,
                  feature_layer=-1)(ids, **args)  # 'default' drops a row SigLIP lacks


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bf16_logits_follow_hf(family):
    """Vision head dim 64 (the CUDA attention kernel's): bf16 logits within 2x HF's bf16 error
    vs HF in fp32; with the sizes as lists, vlmkern's side runs without a host sync."""
    hf32 = _hf(family, vision_head_dim=64)
    batch = _batch(hf32, family)
    sizes = {k: batch[k].tolist() for k in ("image_sizes", "batch_num_images") if k in batch}
    inputs = on(batch, "cuda")

    def sync_free(vk16, ids, args):  # with the sizes as lists, read on the CPU before
        vision = {k: v for k, v in args.items() if k != "attention_mask"}
        vk16.language_inputs(ids, **{**vision, **sizes})

    assert_cuda_bf16_follows_hf(hf32.cuda(), LlavaNext.from_hf, inputs, sync_free)
