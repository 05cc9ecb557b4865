"""vlmkern.models.Mllama (Llama-3.2-Vision) vs HF's tiny model: the tiled vision tower, logits in
fp32 (images of 1 and 2 tiles, two aspect ratios, rows that see no image, left padding, a fully
masked image) and bf16, gradients, greedy generation, state dicts, bad inputs, CUDA bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from integrations.hf_models import (
    assert_copies_load_both_ways,
    assert_cuda_bf16_follows_hf,
    assert_generate_equals_hf,
    assert_grads_close,
    mllama,
    mllama_pixel_inputs,
    on,
    prefill_host_reads,
    rel,
)
from integrations.hf_models import vlmkern_calls as _calls
from projector_testing import assert_lowprec_tier

from vlmkern.models.mllama import Mllama, MllamaVisionTransformer

_PIXEL_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


def _build(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    hf, _ = mllama()
    hf = hf.to(dtype).eval()
    return hf, Mllama.from_hf(hf).eval()


def _inputs(case: str = "tiles") -> dict:
    """HF's keyword arguments. "tiles": the builder's 2 images x 2 tiles per row (aspect ids
    1 and 2, one- and two-tile masks, rows that see nothing, left padding on row 1);
    "masked image": image (1, 0) has every tile masked (id 0, as padding); "no mask": no
    cross_attention_mask (every row sees every tile); "text": no image at all."""
    torch.manual_seed(1)
    inputs = mllama_pixel_inputs()
    if case == "masked image":
        inputs["aspect_ratio_ids"][1, 0] = 0
        inputs["aspect_ratio_mask"][1, 0] = 0
    elif case == "no mask":
        del inputs["cross_attention_mask"]
    elif case == "text":
        inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    return inputs


def _vk(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "input_ids"}


def _positions(inputs: dict) -> torch.Tensor:
    """vlmkern's positions (real tokens counted, as HF's generate): HF's forward alone would
    number the left padding too."""
    return (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)


def _tower_inputs(inputs: dict) -> dict:
    return {k: inputs[k] for k in _PIXEL_KEYS}


@pytest.mark.parametrize("case", ["tiles", "masked image"])
def test_tower_equals_hf(case, path):
    hf, vk = _build()
    args = _tower_inputs(_inputs(case))
    with torch.no_grad():
        want = hf.model.vision_model(**args).last_hidden_state
        got = vk.vision_model(**args)
    assert got.shape == want.shape == (2, 2, 2, 5, 64) and want.abs().max() > 0
    assert rel(got, want) <= 1e-5
    # the aspect-ratio terms matter: another id changes the output
    other = dict(args, aspect_ratio_ids=args["aspect_ratio_ids"].flip(1))
    with torch.no_grad():
        assert rel(vk.vision_model(**other), want) > 1e-3


@pytest.mark.parametrize("case", ["tiles", "masked image", "no mask", "text"])
def test_logits_equal_hf(case, path):
    hf, vk = _build()
    inputs = _inputs(case)
    with torch.no_grad():
        expected = hf(**inputs, position_ids=_positions(inputs)).logits
        got = vk(inputs["input_ids"], **_vk(inputs)).logits
    assert expected.abs().max() > 0 and got.shape == expected.shape
    assert rel(got, expected) <= 1e-5
    if case == "tiles":  # the images reach the text: without them the logits differ
        text = _inputs("text")
        with torch.no_grad():
            blind = vk(text["input_ids"], **_vk(text)).logits
        assert rel(blind[0, 2:], got[0, 2:]) > 1e-3


def test_image_states_equal_hf():
    hf, vk = _build()
    args = _tower_inputs(_inputs())
    with torch.no_grad():
        tower = hf.model.vision_model(**args).last_hidden_state
        want = hf.model.multi_modal_projector(tower).reshape(2, -1, 256)
        got = vk.image_states(**args)
    assert got.shape == (2, 2 * 2 * 5, 256) and rel(got, want) <= 1e-5


def test_gradients_equal_hf(path):
    hf, vk = _build()
    hf.train()
    vk.train()
    inputs = _inputs()
    pixels = inputs["pixel_values"].clone().requires_grad_()
    inputs = dict(inputs, pixel_values=pixels)
    weight = torch.randn(inputs["input_ids"].shape + (160,))
    (hf(**inputs, position_ids=_positions(inputs)).logits * weight).sum().backward()
    expected_pixels = pixels.grad.clone()
    pixels.grad = None
    (vk(inputs["input_ids"], **_vk(inputs)).logits * weight).sum().backward()
    for ours, theirs in ((vk.vision_model, hf.model.vision_model),
                         (vk.multi_modal_projector, hf.model.multi_modal_projector)):
        expected = {n: p.grad for n, p in theirs.named_parameters()}
        got = {n: p.grad for n, p in ours.named_parameters()}
        assert all(g is not None for g in expected.values())
        assert_grads_close(got, expected)
    assert expected_pixels.abs().max() > 0
    assert rel(pixels.grad, expected_pixels) <= 1e-4


def test_bf16_within_twice_hfs_error():
    """G3(b): logits and tower output vs HF in float64, within 2x HF's own bf16 error."""
    hf, _ = _build()
    inputs = _inputs()
    inputs["position_ids"] = _positions(inputs)
    tower = _tower_inputs(inputs)
    with torch.no_grad():
        hf64 = copy.deepcopy(hf).double()
        ref = {"logits": hf64(**on(inputs, dtype=torch.float64)).logits,
               "tower": hf64.model.vision_model(**on(tower, dtype=torch.float64))
               .last_hidden_state}
        hf16 = copy.deepcopy(hf).bfloat16()
        vk16 = Mllama.from_hf(hf16)
        pt = {"logits": hf16(**on(inputs, dtype=torch.bfloat16)).logits,
              "tower": hf16.model.vision_model(**on(tower, dtype=torch.bfloat16))
              .last_hidden_state}
        args = {k: v for k, v in _vk(inputs).items() if k != "position_ids"}
        got = {"logits": vk16(inputs["input_ids"], **args).logits,
               "tower": vk16.vision_model(**tower)}
    for key, r in ref.items():
        assert r.abs().max() > 0 and got[key].dtype == torch.bfloat16
        assert rel(got[key], r) > 1e-4  # bf16 really ran
        assert_lowprec_tier(got[key], pt[key], r, what=key)


@pytest.mark.parametrize("case", ["tiles", "masked image", "no mask", "text"])
def test_generate_equals_hf(case):
    """Token for token with HF's generate, step logits within 1e-5 (left-padded row, the
    cross-attention mask extended over the decode steps as HF extends it)."""
    hf, vk = _build()
    assert_generate_equals_hf(hf, vk, _inputs(case), steps=6)


def test_generate_without_padding_and_eos():
    hf, vk = _build()
    inputs = {k: v[:1] for k, v in _inputs().items()}
    del inputs["attention_mask"]
    assert_generate_equals_hf(hf, vk, inputs, steps=4)
    ids = vk.generate(inputs["input_ids"], 4, **_vk(inputs))
    first = int(ids[0, 9])
    stopped = vk.generate(inputs["input_ids"], 4, eos_token_id=first, **_vk(inputs))
    assert stopped.shape == (1, 10) and torch.equal(stopped, ids[:, :10])


def test_full_length_mask_is_cut_at_the_cache():
    """A decode step given the whole (past + 1) cross_attention_mask uses its last row, as HF's
    forward slices it."""
    from transformers import DynamicCache

    hf, vk = _build()
    inputs = _inputs()
    ids, args = inputs["input_ids"], _vk(inputs)
    nxt = torch.tensor([[11], [12]])
    full = dict(args, cross_attention_mask=torch.cat(
        [args["cross_attention_mask"], args["cross_attention_mask"][:, -1:]], 1))
    mask = torch.cat([args["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        cache = DynamicCache(config=vk.language_model.config)
        vk(ids, past_key_values=cache, use_cache=True, **args)
        got = vk(nxt, attention_mask=mask, past_key_values=cache, use_cache=True,
                 cross_attention_mask=full["cross_attention_mask"]).logits
        whole = vk(torch.cat([ids, nxt], 1), **dict(full, attention_mask=mask)).logits
    assert rel(got[:, -1], whole[:, -1]) <= 1e-5


def test_vlmkern_ops_run(path):
    _, vk = _build()
    inputs = _inputs()
    with torch.no_grad():
        calls = _calls(lambda: vk(inputs["input_ids"], **_vk(inputs)))
    assert calls["patch_embed"] == 1 and calls["mlp_projector"] == 3  # 2 local + 1 global
    assert calls["gated_linear"] == 1  # the global layer's o_proj
    assert calls["cross_attention"] == (3 if path == "kernel" else 0)


def test_compile_one_graph_without_host_reads():
    _, vk = _build()
    inputs = _inputs()
    reads = prefill_host_reads(vk, inputs["input_ids"], _vk(inputs))
    assert not reads, reads


def test_state_dicts_load_both_ways_and_the_llm_is_shared():
    hf, vk = _build()
    assert_copies_load_both_ways([(vk.vision_model, hf.model.vision_model),
                                  (vk.multi_modal_projector, hf.model.multi_modal_projector)])
    assert vk.language_model is hf.model.language_model and vk.lm_head is hf.lm_head
    assert not vk.vision_model.training and Mllama.from_hf(hf.train()).vision_model.training


def test_uint8_pixels_equal_normalized_floats():
    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    hf, _ = _build()
    vk = Mllama.from_hf(hf, mean=mean, std=std, rescale=1 / 255).eval()
    args = _tower_inputs(_inputs())
    raw = torch.randint(0, 256, args["pixel_values"].shape, dtype=torch.uint8)
    norm = (raw / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        want = hf.model.vision_model(**dict(args, pixel_values=norm)).last_hidden_state
        got = vk.vision_model(**dict(args, pixel_values=raw))
    assert rel(got, want) <= 1e-5
    with pytest.raises(ValueError, match="uint8 pixels need"):
        Mllama.from_hf(hf).vision_model(**dict(args, pixel_values=raw))


def test_bad_inputs():
    hf, vk = _build()
    inputs = _inputs()
    ids, args = inputs["input_ids"], _vk(inputs)
    pixels, xmask = args["pixel_values"], args["cross_attention_mask"]
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, images, 2, 3, 28, 28\)"):
        vk(ids, **dict(args, pixel_values=pixels[:, :, :1]))  # fewer than max_num_tiles
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, images, 2, 3, 28, 28\)"):
        vk(ids, **dict(args, pixel_values=pixels[..., :14]))
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, images, 2, 3, 28, 28\)"):
        vk(ids, **dict(args, pixel_values=pixels[0]))
    with pytest.raises(ValueError, match=r"aspect_ratio_ids must be an int tensor \(2, 2\)"):
        vk(ids, **dict(args, aspect_ratio_ids=None))
    with pytest.raises(ValueError, match=r"aspect_ratio_ids must be an int tensor \(2, 2\)"):
        vk(ids, **dict(args, aspect_ratio_ids=args["aspect_ratio_ids"].float()))
    with pytest.raises(ValueError, match=r"aspect_ratio_mask must be \(2, 2, 2\)"):
        vk(ids, **dict(args, aspect_ratio_mask=args["aspect_ratio_mask"][:, :, 0]))
    with pytest.raises(ValueError, match=r"cross_attention_mask must be \(B, S, images, 2\)"):
        vk(ids, **dict(args, cross_attention_mask=xmask[..., :1]))
    with pytest.raises(ValueError, match=r"cross_attention_mask must be \(B, S, images, 2\)"):
        vk(ids, **dict(args, cross_attention_mask=xmask[:, :, 0]))
    with pytest.raises(TypeError, match=r"unexpected inputs \['image_grid_thw'\]"):
        vk(ids, **dict(args, image_grid_thw=None))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        vk.generate(ids, 0, **args)
    with pytest.raises(NotImplementedError, match="is not MllamaVisionModel"):
        MllamaVisionTransformer.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(NotImplementedError, match="takes an HF"):
        Mllama.from_hf(hf.model)
    vision = copy.deepcopy(hf.config.vision_config)
    vision.intermediate_layers_indices = [vision.num_hidden_layers]  # HF: IndexError
    with pytest.raises(ValueError, match="must index the 2 local layers"):
        MllamaVisionTransformer(vision)
    hf.config.model_type = "llava"
    with pytest.raises(NotImplementedError, match="only MllamaForConditionalGeneration"):
        Mllama.from_hf(hf)


@pytest.mark.gpu
def test_cuda_bf16_logits_follow_hf():
    """Vision head dim 64 (the CUDA attention kernel's, with key ranges): bf16 logits within 2x
    HF's error vs HF in fp32; vlmkern's side of the prefill without a host sync."""
    small, _ = mllama()
    cfg = small.config
    cfg.vision_config.hidden_size, cfg.vision_config.intermediate_size = 256, 512
    cfg.vision_config.vision_output_dim = 512
    torch.manual_seed(0)
    hf32 = type(small)(cfg).to("cuda").eval()
    with torch.no_grad():
        for name, p in hf32.named_parameters():
            if "gate" in name:
                p.fill_(0.7)

    def sync_free(vk16, ids, args):
        vk16.language_inputs(ids, **args)

    inputs = on(_inputs(), "cuda")
    del inputs["attention_mask"]  # HF's forward numbers the left padding; vlmkern does not
    assert_cuda_bf16_follows_hf(hf32, Mllama.from_hf, inputs, sync_free)
    vk = Mllama.from_hf(copy.deepcopy(hf32).bfloat16())
    with torch.no_grad():
        calls = _calls(lambda: vk(inputs["input_ids"], **on(_vk(inputs), "cuda",
                                                              torch.bfloat16)))
    assert calls["cross_attention"] >= 3, calls
