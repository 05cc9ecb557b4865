"""vlmkern.models' complete VLMs (Llava, QwenVL) built from tiny HF models: logits, greedy
generation (left-padded batches, decode steps on the KV cache) and gradients equal HF's; the
vlmkern ops run; the prefill compiles as one graph without host reads; bad inputs raise."""

from __future__ import annotations

import copy

import pytest
import torch
from integrations.hf_models import (
    IMAGE_TOKEN,
    MODELS,
    assert_grads_close,
    on,
    qwen_video_inputs,
    rel,
)
from integrations.hf_models import vlmkern_calls as _calls
from testing_utils import compile_recording, sync_points

pytest.importorskip("transformers")
from vlmkern.models import Llava, QwenVL  # noqa: E402

FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
# The vlmkern ops each family runs on the CPU (profiler names).
# On the CPU the CLIP tower attends with SDPA (faster there: models/vision_transformer.py).
OPS = {"llava": {"patch_embed", "mlp_projector"},
       "qwen2_vl": {"patch_embed_packed", "cross_attention", "mlp_projector",
                    "mrope_position_ids"},
       "qwen2_5_vl": {"patch_embed_packed", "cross_attention", "mlp_projector",
                      "mrope_position_ids"},
       "qwen3_vl": {"patch_embed_packed", "cross_attention", "mlp_projector",
                    "mrope_position_ids"}}
OPS["qwen3_vl_moe"] = OPS["qwen3_vl"]


def _build(family: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    hf, inputs = MODELS[family]()
    hf = hf.to(device, dtype).eval()
    cls = Llava if family == "llava" else QwenVL
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
    if padded:
        inputs = _left_padded(inputs)
    hf.generation_config.pad_token_id = 0
    expected = hf.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None)
    got = vk.generate(inputs["input_ids"], 6, **_vk_inputs(inputs))
    assert expected.shape == got.shape and torch.equal(got, expected), (got, expected)


def test_generate_stops_at_eos():
    _, vk, inputs = _build("llava")
    ids, s = inputs["input_ids"], inputs["input_ids"].shape[1]
    free = vk.generate(ids, 4, **_vk_inputs(inputs))[:, s:]
    eos = int(free[0, 1])  # row 0's second new token
    got = vk.generate(ids, 4, eos_token_id=eos, **_vk_inputs(inputs))[:, s:]
    first = [int((row == eos).nonzero()[0]) if (row == eos).any() else len(row) for row in free]
    assert got.shape[1] == min(4, max(first) + 1)  # stops once every row has produced it
    for row, stop in enumerate(first):  # the same tokens up to eos, then eos only
        assert torch.equal(got[row, : stop + 1], free[row, : stop + 1])
        assert (got[row, stop:] == eos).all()


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
    tower = vk.vision_tower if family == "llava" else vk.visual
    hf_tower = hf.model.vision_tower if family == "llava" else hf.model.visual
    expected = {n: p.grad for n, p in hf_tower.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in tower.named_parameters() if n in expected}
    assert expected and got.keys() == expected.keys()
    assert_grads_close(got, expected)
    assert rel(pixels.grad, expected_pixels) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_one_graph_without_host_reads(family):
    _, vk, inputs = _build(family)
    args = _vk_inputs(inputs)

    def prefill(ids):
        return vk(ids, **args).logits

    # HF's RMSNorm eps, seen with other values by earlier compiles of the same code, would come
    # in as a dynamic float (an item() of a CPU scalar, not a device read): start afresh
    torch._dynamo.reset()
    compiled, graphs = compile_recording(prefill)
    with torch.no_grad():
        got, expected = compiled(inputs["input_ids"]), prefill(inputs["input_ids"])
    assert len(graphs) == 1, len(graphs)
    nodes = {n.name: n for n in graphs[0].graph.nodes}
    reads = [n for n in sync_points(graphs[0])
             if not (family.startswith("qwen3") and "deepstack" in nodes[n].meta["stack_trace"])]
    assert not reads, reads  # Qwen3-VL: HF's text model adds DeepStack rows by a boolean mask
    assert rel(got, expected) <= 1e-6


def test_bad_inputs():
    _, vk, inputs = _build("llava")
    ids = inputs["input_ids"]
    with pytest.raises(RuntimeError, match="placeholders in input_ids"):
        vk(ids[:, :-3], pixel_values=inputs["pixel_values"])
    with pytest.raises(TypeError, match="unexpected inputs"):
        vk(ids, pixel_values=inputs["pixel_values"], image_grid_thw=None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        vk.generate(ids, 0, pixel_values=inputs["pixel_values"])
    _, qwen, inputs = _build("qwen2_vl")
    with pytest.raises(ValueError, match="without their grid_thw"):
        qwen(inputs["input_ids"], pixel_values=inputs["pixel_values"])
    cache = qwen(inputs["input_ids"], use_cache=True, **_vk_inputs(inputs)).past_key_values
    with pytest.raises(ValueError, match="rope_deltas"):
        qwen(inputs["input_ids"][:, :1], past_key_values=cache)
    with pytest.raises(ValueError, match="select_strategy"):
        Llava(vk.vision_tower, vk.multi_modal_projector, vk.language_model, vk.lm_head,
              image_token_id=1, select_strategy="cls")


def test_shares_the_language_model():
    hf, vk, _ = _build("llava")
    assert vk.language_model is hf.model.language_model and vk.lm_head is hf.lm_head
    copied = copy.deepcopy(vk)
    assert copied.vision_tower is not vk.vision_tower


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bf16_logits_follow_hf(family):
    hf32, vk, inputs = _build(family, "cuda")
    hf16 = copy.deepcopy(hf32).bfloat16()
    vk16, inputs16 = type(vk).from_hf(hf16), on(inputs, "cuda", torch.bfloat16)
    with torch.no_grad():
        ref = hf32(**inputs).logits
        pt_err = (hf16(**inputs16).logits.float() - ref).abs().max()
        err = (vk16(inputs["input_ids"], **_vk_inputs(inputs16)).logits.float() - ref).abs().max()
    assert ref.abs().max() > 0 and err <= 2 * pt_err + 1e-2
