"""vlmkern.models.PaliGemma vs HF's tiny PaliGemma 1 (Gemma) and 2 (Gemma 2, sliding window):
logits with and without the prefix (token_type_ids), an image token outside the vocabulary,
greedy generation (left-padded too), gradients, bf16, uint8 pixels, compile, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from integrations.hf_models import (
    IMAGE_TOKEN,
    assert_cuda_bf16_follows_hf,
    assert_generate_equals_hf,
    assert_grads_close,
    on,
    prefill_host_reads,
    rel,
)
from integrations.hf_models import vlmkern_calls as _calls

from vlmkern.models import PaliGemma

VERSIONS = [1, 2, 3]  # the text model: Gemma, Gemma 2, Gemma 3
IMAGE_TOKENS = 4  # a 28 x 28 image in patches of 14


def _build(version: int, vision_head_dim: int = 8, image_token_id: int = IMAGE_TOKEN,
           device: str = "cpu"):
    """HF's tiny model (eval) and vlmkern's copy; Gemma 2 with a 4-token sliding window, shorter
    than the prompt, so the sliding mask matters."""
    vc = dict(hidden_size=4 * vision_head_dim, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=28, patch_size=14, projection_dim=48)
    tc = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=1, head_dim=12, vocab_size=160,
              model_type={1: "gemma", 2: "gemma2", 3: "gemma3_text"}[version])
    if version > 1:
        tc.update(sliding_window=4, query_pre_attn_scalar=12)
    cfg = T.PaliGemmaConfig(vision_config=vc, text_config=tc, image_token_id=image_token_id,
                            projection_dim=48)
    hf = T.PaliGemmaForConditionalGeneration(cfg).to(device).eval()
    return hf, PaliGemma.from_hf(hf).eval()


def _inputs(batch: int = 1, image_token_id: int = IMAGE_TOKEN, prefix: bool = True) -> dict:
    """``batch`` rows of <image> x 4, bos, 3 prompt tokens (the prefix), 2 answer tokens."""
    ids = torch.tensor([[image_token_id] * IMAGE_TOKENS + [2, 5, 6, 7, 8, 9]] * batch)
    out = dict(input_ids=ids, pixel_values=torch.randn(batch, 3, 28, 28))
    if prefix:
        out["token_type_ids"] = torch.tensor([[0] * 8 + [1] * 2] * batch)
    return out


def _left_padded(inputs: dict) -> dict:
    """Two rows, the second after two pad tokens (masked, in the prefix as the processor puts
    them)."""
    pad = lambda t, v: torch.cat([torch.full((2, 2), v), t.repeat(2, 1)], 1)  # noqa: E731
    ids = pad(inputs["input_ids"][:1], 0)
    ids[0, :2] = torch.tensor([5, 6])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return dict(input_ids=ids, attention_mask=mask,
                pixel_values=inputs["pixel_values"][:1].repeat(2, 1, 1, 1),
                token_type_ids=pad(inputs["token_type_ids"][:1], 0))


@pytest.mark.parametrize("version, attention", [(1, "sdpa"), (1, "eager"), (2, "eager"),
                                                (3, "sdpa")])
@pytest.mark.parametrize("prefix", [True, False])
def test_logits_equal_hf(version, attention, prefix):
    """Without token_type_ids the mask is HF's: none under SDPA for PaliGemma's bidirectional
    Gemma (an unpadded prompt), causal under eager."""
    hf, vk = _build(version)
    hf.config.get_text_config()._attn_implementation = attention
    inputs = _inputs(2, prefix=prefix)
    args = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        expected = hf(**inputs).logits
        got = vk(inputs["input_ids"], **args).logits
        untyped = vk(inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    assert expected.abs().max() > 0 and got.shape == expected.shape
    assert rel(got, expected) <= 1e-5
    # the prefix pattern changes the prompt's logits (the mask without it would not pass)
    assert (rel(untyped, expected) > 1e-3) == prefix


@pytest.mark.parametrize("version", VERSIONS)
def test_later_chunk_with_token_types_is_causal_and_later_images_raise(version):
    """With a cache, token_type_ids without pixels no longer make a prefix (HF's first-iteration
    rule); pixels with a cache raise (HF's mask would be shifted by the cache length)."""
    from transformers import DynamicCache

    hf, vk = _build(version)
    inputs = _inputs()
    more = torch.arange(11, 25)[None]  # longer than the cache: HF pads the ids on the right
    types = torch.zeros_like(more)
    with torch.no_grad():
        hf_cache, vk_cache = DynamicCache(config=hf.config.get_text_config()), DynamicCache()
        hf(**inputs, past_key_values=hf_cache, use_cache=True)
        vk(**inputs, past_key_values=vk_cache, use_cache=True)
        expected = hf(input_ids=more, token_type_ids=types, past_key_values=hf_cache).logits
        got = vk(more, token_type_ids=types, past_key_values=vk_cache).logits
        with pytest.raises(NotImplementedError, match="images after the first turn"):
            vk(**inputs, past_key_values=vk_cache)
    assert rel(got, expected) <= 1e-5


def test_image_token_outside_the_vocabulary():
    hf, vk = _build(1, image_token_id=170)  # vocab 160: HF embeds the placeholders as token 0
    inputs = _inputs(image_token_id=170)
    with torch.no_grad():
        expected = hf(**inputs).logits
        got = vk(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                 token_type_ids=inputs["token_type_ids"]).logits
    assert rel(got, expected) <= 1e-5


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("padded", [False, True])
def test_generate_equals_hf(version, padded):
    hf, vk = _build(version)
    inputs = _inputs()
    assert_generate_equals_hf(hf, vk, _left_padded(inputs) if padded else inputs)


def test_vlmkern_ops_run():
    _, vk = _build(1)
    inputs = _inputs()
    with torch.no_grad():
        calls = _calls(lambda: vk(**inputs))
    assert {"patch_embed", "mlp_projector"} <= set(calls), calls


@pytest.mark.parametrize("version", VERSIONS)
def test_gradients_equal_hf(version):
    hf, vk = _build(version)
    hf.train()
    vk.train()
    inputs = _inputs(2)
    pixels = inputs["pixel_values"].clone().requires_grad_()
    inputs["pixel_values"] = pixels
    weight = torch.randn(2, 10, 160)
    (hf(**inputs).logits * weight).sum().backward()
    expected_pixels, pixels.grad = pixels.grad.clone(), None
    (vk(**inputs).logits * weight).sum().backward()
    for ours, theirs in ((vk.vision_tower, hf.model.vision_tower),
                         (vk.multi_modal_projector, hf.model.multi_modal_projector)):
        expected = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
        got = {n: p.grad for n, p in ours.named_parameters() if n in expected}
        assert expected and got.keys() == expected.keys()
        assert_grads_close(got, expected)
    assert rel(pixels.grad, expected_pixels) <= 1e-4


@pytest.mark.parametrize("version", VERSIONS)
def test_bf16_within_twice_hfs_error(version):
    hf, _ = _build(version)
    inputs = _inputs(2)
    with torch.no_grad():
        ref = hf(**inputs).logits.double()
        hf16 = copy.deepcopy(hf).bfloat16()
        inputs16 = on(inputs, dtype=torch.bfloat16)
        pt_err = (hf16(**inputs16).logits.double() - ref).abs().max()
        got = PaliGemma.from_hf(hf16)(**inputs16).logits
    err = (got.double() - ref).abs().max()
    assert got.dtype == torch.bfloat16 and err > 0
    assert err <= 2 * pt_err + 1e-6 * ref.abs().max()


def test_uint8_pixels_equal_hf_on_normalized_pixels():
    hf, _ = _build(1)
    mean, std = [0.5] * 3, [0.5] * 3  # PaliGemma's processor
    vk = PaliGemma.from_hf(hf, mean=mean, std=std, rescale=1 / 255)
    inputs = _inputs()
    u = torch.randint(0, 256, (1, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = hf(**dict(inputs, pixel_values=(u / 255 - 0.5) / 0.5)).logits
        got = vk(**dict(inputs, pixel_values=u)).logits
    assert rel(got, expected) <= 1e-5


@pytest.mark.parametrize("version", VERSIONS)
def test_compile_one_graph_without_host_reads(version):
    _, vk = _build(version)
    inputs = _inputs()
    args = {k: v for k, v in inputs.items() if k != "input_ids"}
    reads = prefill_host_reads(vk, inputs["input_ids"], args)
    assert not reads, reads


def test_bad_inputs():
    hf, vk = _build(1)
    inputs = _inputs()
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    with pytest.raises(RuntimeError, match="placeholders in input_ids"):
        vk(ids[:, 1:], pixel_values=pixels)
    with pytest.raises(TypeError, match="unexpected inputs"):
        vk(ids, pixel_values=pixels, image_sizes=None)
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, H, W\)"):
        vk(ids, pixel_values=pixels[0])
    with pytest.raises(ValueError, match="uint8 pixels need"):
        vk(ids, pixel_values=pixels.to(torch.uint8))
    with pytest.raises(NotImplementedError, match=r"from_hf takes an HF \*ForConditionalGen"):
        PaliGemma.from_hf(hf.model)
    hf.config.model_type = "gemma3"
    with pytest.raises(NotImplementedError, match="only PaliGemma models"):
        PaliGemma.from_hf(hf)


@pytest.mark.gpu
@pytest.mark.parametrize("version", VERSIONS)
def test_cuda_bf16_logits_follow_hf(version):
    """Vision head dim 64: SigLIP's attention runs the CUDA kernels; vlmkern's side of the
    forward (features into the embeddings, positions) runs without a host sync."""
    hf32, _ = _build(version, vision_head_dim=64, device="cuda")

    def sync_free(vk16, ids, args):
        vk16.language_inputs(ids, **args)
        vk16.positions(ids, None, 0, None, args)

    assert_cuda_bf16_follows_hf(hf32, PaliGemma.from_hf, on(_inputs(2), "cuda"), sync_free)
