"""vlmkern.integrations.hf.patch_model on tiny HF VLMs: the patched model runs vlmkern's ops and
gives HF's logits and gradients, keeps HF's parameters (same objects, same state dict), leaves
hooked / adapted modules alone, and its function patches can be undone."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import EXPECTED, MLLAMA_TILE_TOKENS, MODELS, OPS

pytest.importorskip("transformers")
from vlmkern.integrations import hf as vhf  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_functions():
    yield
    vhf.unpatch_functions()


def _pair(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(HF model, patched deep copy, report, inputs) on device in dtype."""
    model, inputs = MODELS[name]()
    model = model.to(device, dtype).eval()
    patched = copy.deepcopy(model)
    report = vhf.patch_model(patched)
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
              for k, v in inputs.items()}
    return model, patched, report, inputs


def _ops_run(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name.removeprefix("vlmkern::") for e in prof.events()
            if e.name.startswith("vlmkern::")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patched_model_matches_hf_and_runs_vlmkern(name):
    model, patched, report, inputs = _pair(name)
    assert {p: hf for p, hf, _ in report.replaced} == EXPECTED[name], str(report)
    assert not report.skipped, str(report)
    assert all(vk.startswith("vlmkern.") for _, _, vk in report.replaced)
    with torch.no_grad():
        expected = model(**inputs).logits
        ran = _ops_run(lambda: patched(**inputs))
        got = patched(**inputs).logits
    assert OPS[name] <= ran, f"vlmkern ops run: {sorted(ran)}"
    assert _rel(got, expected) <= 1e-5


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_match_hf(name):
    model, patched, _, inputs = _pair(name)
    grads = []
    for m in (model, patched):
        m.train()
        m.zero_grad()
        logits = m(**inputs).logits
        (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    # A gradient that is 0 in exact math (a key bias under softmax) is rounding noise in both:
    # its error is measured against a thousandth of the largest gradient.
    floor = 1e-3 * max(g.abs().max().item() for g in grads[0].values())
    for n, g in grads[0].items():
        err = (grads[1][n].double() - g.double()).abs().max().item()
        assert err <= 1e-4 * max(g.abs().max().item(), floor), n


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
        ref = ref_model(**{k: v.to(ref_dtype) if v.is_floating_point() else v
                           for k, v in inputs.items()}).logits.double()
    model, patched, _, inputs = _pair(name, device, dtype)
    with torch.no_grad():
        hf_err = (model(**inputs).logits.double().cpu() - ref).abs().max().item()
        vk_err = (patched(**inputs).logits.double().cpu() - ref).abs().max().item()
    assert vk_err <= 2 * hf_err + 1e-3, (vk_err, hf_err)


def test_mllama_decode_step_with_the_cache():
    model, patched, _, inputs = _pair("mllama")

    def step(m):
        with torch.no_grad():
            out = m(**inputs, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            mask = inputs["cross_attention_mask"][:, -1:]
            return m(input_ids=nxt, cross_attention_mask=mask, past_key_values=out.past_key_values,
                     use_cache=True).logits

    assert _rel(step(patched), step(model)) <= 1e-5


def test_mllama_gradient_checkpointing_carries_over():
    model, inputs = MODELS["mllama"]()
    model.activation_checkpointing_enable()
    vhf.patch_model(model)
    layer = model.model.language_model.layers[1]
    assert type(layer).__name__ == "HFMllamaCrossAttentionDecoderLayer"
    assert layer.gradient_checkpointing
    model.train()
    calls, run = [], layer._layer

    def counted(*args):
        calls.append(1)
        return run(*args)

    layer._layer = counted
    model(**inputs).logits.sum().backward()
    assert len(calls) == 2  # the forward, and its recomputation in the backward


def test_mllama_layer_rejects_a_mask_without_tiles():
    model, patched, _, inputs = _pair("mllama")
    layer = patched.model.language_model.layers[1]
    assert layer.num_vision_tokens == MLLAMA_TILE_TOKENS
    x = torch.randn(2, 7, 256)
    states = inputs["cross_attention_states"]
    bad = torch.zeros(2, 1, 7, states.shape[1] - 1)
    with pytest.raises(ValueError, match="tiles of 5 keys"):
        layer(x, states, bad, None, None)
    with pytest.raises(ValueError, match="needs cross_attention_states or a cache"):
        layer(x, None, None, None, None)


def test_hooked_or_adapted_modules_are_left_alone():
    model, inputs = MODELS["llava"]()
    model.eval()
    calls = []
    model.model.multi_modal_projector.register_forward_hook(lambda *a: calls.append(1))
    emb = model.model.vision_tower.embeddings
    emb.patch_embedding.lora_A = torch.nn.Linear(3, 2)  # parameters vlmkern's module lacks
    report = vhf.patch_model(model)
    assert not report.replaced
    why = {p: w for p, _, w in report.skipped}
    assert "hooks" in why["model.multi_modal_projector"]
    assert "HF only" in why["model.vision_tower.embeddings"]
    with torch.no_grad():
        model(**inputs)
    assert calls == [1]


def test_switches_choose_what_is_patched():
    model, _ = MODELS["qwen2_vl"]()
    report = vhf.patch_model(model, embeddings=False, vision_attention=False, rope=False)
    assert [p for p, _, _ in report.replaced] == ["model.visual.merger"]
    assert not report.functions
    assert "1 modules replaced, 0 functions patched" in str(report)


def test_rope_functions_are_restored():
    from transformers.models.qwen2_vl import modeling_qwen2_vl as mod

    hf_fn = mod.apply_rotary_pos_emb_vision
    model, _ = MODELS["qwen2_vl"]()
    report = vhf.patch_model(model)
    assert f"{mod.__name__}.apply_rotary_pos_emb_vision" in report.functions
    assert mod.apply_rotary_pos_emb_vision is not hf_fn
    vhf.unpatch_functions()
    assert mod.apply_rotary_pos_emb_vision is hf_fn


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
        assert _rel(root["proj"](x), hf(x)) <= 1e-6


def test_patched_layers_compile_without_graph_breaks():
    """The swapped-in Mllama layer (HF's dense mask read back as ranges) and Qwen ViT attention
    under torch.compile(fullgraph=True)."""
    _, patched, _, inputs = _pair("mllama")
    layer = patched.model.language_model.layers[1]
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    mask, rows = _prepare_cross_attention_mask(inputs["cross_attention_mask"],
                                               MLLAMA_TILE_TOKENS, torch.float32)
    x, states = torch.randn(2, 7, 256), inputs["cross_attention_states"]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, states, mask, None, rows),
                                   layer(x, states, mask, None, rows))

    _, patched, _, _ = _pair("qwen2_vl")
    attn = patched.model.visual.blocks[0].attn
    x = torch.randn(28, 32)
    cu = torch.tensor([0, 24, 28], dtype=torch.int32)
    angles = torch.randn(28, 4)
    pe = (torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin())
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, cu, pe), attn(x, cu, pe))


def test_llava_generate_gives_hfs_tokens():
    model, patched, _, inputs = _pair("llava")
    kw = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(patched.generate(**inputs, **kw), model.generate(**inputs, **kw))


def test_mllama_attention_dropout_is_not_swapped():
    model, _ = MODELS["mllama"]()
    model.model.language_model.layers[1].cross_attn.dropout = 0.1
    report = vhf.patch_model(model)
    assert not report.replaced
    assert "dropout" in report.skipped[0][2]
