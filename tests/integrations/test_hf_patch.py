"""vlmkern.integrations.hf.patch_model on tiny HF VLMs: the patched model runs vlmkern's ops and
gives HF's logits, gradients, generated tokens and cache steps (Mllama through its own image path
too), and keeps HF's parameters (same objects, same state dict).

HF's outputs are always computed before the patch: the rope patch is process-wide, so an HF model
run after it would run vlmkern's rope too and hide any error in it."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import (
    EXPECTED,
    MODELS,
    OPS,
    assert_grads_close,
    mllama_pixel_inputs,
    on,
    qwen_video_inputs,
    rel,
    vision_encoder,
    vlmkern_calls,
)

pytest.importorskip("transformers")
from vlmkern.integrations import hf as vhf  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_functions():
    yield
    vhf.unpatch_functions()


def _models(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(HF model, an unpatched deep copy to patch after HF's run, inputs) on device in dtype."""
    model, inputs = MODELS[name]()
    model = model.to(device, dtype).eval()
    return model, copy.deepcopy(model), on(inputs, device, dtype)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patched_model_matches_hf_and_runs_vlmkern(name):
    model, patched, inputs = _models(name)
    with torch.no_grad():
        expected = model(**inputs).logits
    report = vhf.patch_model(patched)
    assert {p: hf for p, hf, _ in report.replaced} == EXPECTED[name], str(report)
    assert not report.skipped, str(report)
    assert all(vk.startswith("vlmkern.") for _, _, vk in report.replaced)
    with torch.no_grad():
        ran = set(vlmkern_calls(lambda: patched(**inputs)))
        got = patched(**inputs).logits
    assert OPS[name] <= ran, f"vlmkern ops run: {sorted(ran)}"
    assert rel(got, expected) <= 1e-5


def _grads(m: torch.nn.Module, inputs: dict) -> dict:
    m.train()
    logits = m(**inputs).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_match_hf(name):
    model, patched, inputs = _models(name)
    expected = _grads(model, inputs)
    vhf.patch_model(patched)
    assert_grads_close(_grads(patched, inputs), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_lowprec_logits_within_twice_hfs_error(name, dtype, device):
    """Against HF's model in float64 (fp32 for the MoE) on the CPU: the patched model's error
    at most twice HF's own (plus a hair for ties), in the model's dtype on each device."""
    ref_model, inputs = MODELS[name]()
    # torch's grouped GEMM (the MoE experts) has no float64: fp32 is that model's reference
    ref_dtype = torch.float32 if name.endswith("_moe") else torch.float64
    ref_model = ref_model.to(ref_dtype).eval()
    with torch.no_grad():
        ref = ref_model(**on(inputs, dtype=ref_dtype)).logits.double()
    model, patched, inputs = _models(name, device, dtype)
    with torch.no_grad():
        hf_err = (model(**inputs).logits.double().cpu() - ref).abs().max().item()
        vhf.patch_model(patched)
        vk_err = (patched(**inputs).logits.double().cpu() - ref).abs().max().item()
    assert vk_err <= 2 * hf_err + 1e-3, (vk_err, hf_err)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "mllama"])
def test_parameters_and_state_dict_are_hfs(name):
    model, _ = MODELS[name]()
    before = dict(model.named_parameters())
    state = model.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the patch
    vhf.patch_model(model)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(after[n] is p for n, p in before.items())
    patched_state = model.state_dict()
    assert patched_state.keys() == state.keys()
    assert all(patched_state[k].data_ptr() == v.data_ptr() for k, v in state.items())
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    # the optimizer's parameters are the ones the patched modules use
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert ids == {id(p) for p in model.parameters()}


def test_mllama_decode_step_with_the_cache():
    model, patched, inputs = _models("mllama")

    def step(m):
        with torch.no_grad():
            out = m(**inputs, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            mask = inputs["cross_attention_mask"][:, -1:]
            return m(input_ids=nxt, cross_attention_mask=mask, past_key_values=out.past_key_values,
                     use_cache=True).logits

    expected = step(model)
    vhf.patch_model(patched)
    assert rel(step(patched), expected) <= 1e-5


@pytest.mark.parametrize("cache", [None, "static"])
def test_mllama_generates_hfs_tokens_from_pixels(cache):
    """Through MllamaModel's own image path: image states (B·images·tiles, tokens, hidden), left
    padding, greedy decoding with HF's dynamic or static cache."""
    model, patched, _ = _models("mllama")
    inputs = mllama_pixel_inputs()
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True,
              return_dict_in_generate=True, cache_implementation=cache)
    with torch.no_grad():
        expected = model.generate(**inputs, **kw)
        vhf.patch_model(patched)
        got = patched.generate(**inputs, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    assert max(rel(g, e) for g, e in zip(got.scores, expected.scores, strict=True)) <= 1e-5


def test_llava_generate_gives_hfs_tokens():
    model, patched, inputs = _models("llava")
    kw = dict(max_new_tokens=5, do_sample=False)
    expected = model.generate(**inputs, **kw)
    vhf.patch_model(patched)
    assert torch.equal(patched.generate(**inputs, **kw), expected)


def test_qwen_video_frames_match_hf():
    """A 2-frame video: the ViT attends within each frame (two cu_seqlens segments)."""
    model, patched, _ = _models("qwen2_vl")
    inputs = qwen_video_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
        vhf.patch_model(patched)
        ran = set(vlmkern_calls(lambda: patched(**inputs)))
        got = patched(**inputs).logits
    assert "cross_attention" in ran
    assert rel(got, expected) <= 1e-5


@pytest.mark.parametrize("cls", ["LlavaNextMultiModalProjector",
                                 "LlavaOnevisionMultiModalProjector",
                                 "LlavaNextVideoMultiModalProjector",
                                 "VideoLlavaMultiModalProjector"])
def test_llava_family_projectors(cls):
    import transformers as T

    family = {"LlavaNextMultiModalProjector": ("llava_next", T.LlavaNextConfig),
              "LlavaOnevisionMultiModalProjector": ("llava_onevision", T.LlavaOnevisionConfig),
              "LlavaNextVideoMultiModalProjector": ("llava_next_video", T.LlavaNextVideoConfig),
              "VideoLlavaMultiModalProjector": ("video_llava", T.VideoLlavaConfig)}
    short, config = family[cls]
    module = __import__(f"transformers.models.{short}.modeling_{short}", fromlist=[cls])
    cfg = config(vision_config=dict(model_type="clip_vision_model", hidden_size=32,
                                    num_attention_heads=4),
                 text_config=dict(model_type="llama", hidden_size=48, num_attention_heads=4))
    hf = getattr(module, cls)(cfg).eval()
    root = torch.nn.ModuleDict({"proj": copy.deepcopy(hf)})
    report = vhf.patch_model(root)
    assert [p for p, _, _ in report.replaced] == ["proj"], str(report)
    x = torch.randn(3, 5, hf.linear_1.in_features)
    with torch.no_grad():
        assert rel(root["proj"](x), hf(x)) <= 1e-6


def test_save_pretrained_round_trip():
    """A patched model saves HF's checkpoint: HF's class loads it and gives the same logits."""
    import tempfile

    import transformers as T

    model, patched, inputs = _models("llava")
    vhf.patch_model(patched)
    with tempfile.TemporaryDirectory() as d:
        patched.save_pretrained(d)
        reloaded = T.LlavaForConditionalGeneration.from_pretrained(d).eval()
    with torch.no_grad():
        assert rel(reloaded(**inputs).logits, model(**inputs).logits) <= 1e-6


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_rope_index_is_hfs(name):
    """get_rope_index on a batch with an image and videos, a text-only row, left padding and
    (Qwen2.5-VL) seconds per grid, called as HF's code calls it, with keywords or positionally,
    with an integer or a float mask: the device op's positions and deltas equal HF's loop's."""
    model, patched, _ = _models(name)
    vision_start, image, video = 150, 151, 152
    frames = [video] * 4  # a (4, 2, 2) grid: one token per frame
    if name.startswith("qwen3"):  # its processor puts a timestamp (text) before each frame
        frames = [video, 30, video, 31, video, 32, video]
    row0 = [1, vision_start, *[image] * 4, 7, vision_start, *frames]
    row0 += list(range(8, 28 - len(row0)))
    row2 = [0] * 6 + [1, vision_start, *frames]
    row2 += list(range(5, 25 - len(row2)))
    ids = torch.tensor([row0, list(range(3, 23)), row2])  # row 1: text only
    mask = torch.ones_like(ids)
    mask[2, :6] = 0
    types = (ids == image).long() + 2 * (ids == video).long()
    grids = torch.tensor([[1, 4, 4]]), torch.tensor([[4, 2, 2], [4, 2, 2]])
    seconds = [[0.5, 1.0]] if name == "qwen2_5_vl" else []  # a list, as processors may give
    calls = [((ids, types, *grids, *seconds, mask), {}),
             ((ids,), dict(mm_token_type_ids=types, image_grid_thw=grids[0],
                           video_grid_thw=grids[1], attention_mask=mask.float(),
                           **({"second_per_grid_ts": seconds[0]} if seconds else {})))]
    expected = [model.model.get_rope_index(*a, **k) for a, k in calls]
    report = vhf.patch_model(patched)
    assert "model.get_rope_index" in report.functions
    for (a, k), want in zip(calls, expected, strict=True):
        got = patched.model.get_rope_index(*a, **k)
        for g, e in zip(got, want, strict=True):
            assert g.dtype == e.dtype and torch.equal(g, e), (g, e)


def _autocast_step(m: torch.nn.Module, inputs: dict) -> tuple:
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(**inputs).logits
    logits.float().square().mean().backward()
    return logits.double(), {n: p.grad.double() for n, p in m.named_parameters()
                             if p.grad is not None}


@pytest.mark.parametrize("name", ["llava", "mllama", "qwen2_vl", "internvl"])
def test_autocast_training_step_within_hfs_error(name):
    """A bf16 autocast training step (fp32 parameters): logits within 2x and gradients within
    3x HF's own autocast error against HF in float64 (as the ops' rules)."""
    model, patched, inputs = _models(name)
    ref = copy.deepcopy(model).double()
    ref.train()
    ref_logits = ref(**on(inputs, dtype=torch.float64)).logits
    ref_logits.square().mean().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    hf_logits, hf_grads = _autocast_step(model, inputs)
    vhf.patch_model(patched)
    vk_logits, vk_grads = _autocast_step(patched, inputs)

    def err(a, b):
        return (a - b).abs().max().item()

    assert err(vk_logits, ref_logits) <= 2 * err(hf_logits, ref_logits) + 1e-3
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n, g in ref_grads.items():
        assert err(vk_grads[n], g) <= 3 * err(hf_grads[n], g) + 1e-3 * scale, n


@pytest.mark.parametrize("family", ["qwen2_5_omni", "glm4v"])
def test_vision_encoders(family):
    """Qwen2.5-Omni's and GLM-4.1V's vision encoders: patch embed and attention swapped (and
    Omni's merger); output and gradients are HF's."""
    encoder = vision_encoder(family).eval()
    patched = copy.deepcopy(encoder)
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
    pixels = torch.randn(28, 3 * 2 * 14 * 14)

    def run(m):
        m.zero_grad()
        out = m(pixels, grid_thw=grid)
        out = getattr(out, "pooler_output", out)
        out.square().sum().backward()
        return out.detach(), {n: p.grad for n, p in m.named_parameters()}

    expected, expected_grads = run(encoder)
    report = vhf.patch_model(patched)
    want = {"patch_embed", "blocks.0.attn", "blocks.1.attn"}
    assert {p for p, _, _ in report.replaced} == want | (
        {"merger"} if family == "qwen2_5_omni" else set()), str(report)
    got, grads = run(patched)
    assert rel(got, expected) <= 1e-5
    assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize("family", ["blip_2", "blip", "instructblip", "instructblipvideo"])
def test_blip_family_vision_models(family):
    """BLIP / BLIP-2 / InstructBLIP(-Video) vision towers: the embeddings swapped, output and
    gradients HF's, at the native size and with resized positions."""
    import importlib

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    prefix = {"blip_2": "Blip2", "blip": "Blip", "instructblip": "InstructBlip",
              "instructblipvideo": "InstructBlipVideo"}[family]
    config_module = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    cfg = getattr(config_module, f"{prefix}VisionConfig")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=28, patch_size=7)
    model = getattr(module, f"{prefix}VisionModel")(cfg).eval()
    patched = copy.deepcopy(model)
    pixels = torch.randn(2, 3, 28, 28), torch.randn(1, 3, 42, 35)

    def run(m):
        m.zero_grad()
        outs = [m(pixels[0]).last_hidden_state,
                m(pixels[1], interpolate_pos_encoding=True).last_hidden_state]
        sum(o.square().sum() for o in outs).backward()
        return [o.detach() for o in outs], {n: p.grad for n, p in m.named_parameters()}

    expected, expected_grads = run(model)
    report = vhf.patch_model(patched)
    assert [p for p, _, _ in report.replaced] == ["embeddings"], str(report)
    got, grads = run(patched)
    assert max(rel(g, e) for g, e in zip(got, expected, strict=True)) <= 1e-5
    for n, g in expected_grads.items():
        assert rel(grads[n], g) <= 1e-4, n
