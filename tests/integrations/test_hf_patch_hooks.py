"""patch_model around HF's machinery: output_hidden_states and gradient checkpointing's input-grad
hooks keep working (set before or after the patch), modules it cannot rebuild faithfully are left
alone (foreign hooks, adapters, Linear / Parameter subclasses, attention dropout), the switches,
undoing the function patches, and torch.compile of the swapped-in layers."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import MLLAMA_TILE_TOKENS, MODELS, assert_grads_close, on, rel

pytest.importorskip("transformers")
from vlmkern.integrations import hf as vhf  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_functions():
    yield
    vhf.unpatch_functions()


def _model(name: str):
    model, inputs = MODELS[name]()
    return model.eval(), on(inputs)


@pytest.mark.parametrize("name", ["mllama", "qwen2_vl"])
@pytest.mark.parametrize("captured_first", [False, True])
def test_output_hidden_states_see_every_layer(name, captured_first):
    """HF records hidden states by hooks on its layer classes; they move to the replacements,
    whether HF installed them before the patch (an earlier output_hidden_states call) or not."""
    model, inputs = _model(name)
    with torch.no_grad():
        expected = model(**inputs, output_hidden_states=True).hidden_states
    patched = copy.deepcopy(_model(name)[0])
    patched.load_state_dict(model.state_dict())
    if captured_first:
        with torch.no_grad():
            patched(**inputs, output_hidden_states=True)
    report = vhf.patch_model(patched)
    assert report.replaced and not report.skipped, str(report)
    with torch.no_grad():
        got = patched(**inputs, output_hidden_states=True).hidden_states
    assert len(got) == len(expected)
    assert max(rel(g, e) for g, e in zip(got, expected, strict=True)) <= 1e-5


def _input_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    visual = getattr(model.model, "visual", None)
    return visual.patch_embed if visual is not None else model.model.vision_tower.embeddings


@pytest.mark.parametrize("name", ["llava", "paligemma", "internvl", "qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("enable_first", [False, True])
def test_gradient_checkpointing_input_grad_hook_fires(name, enable_first):
    """activation_checkpointing_enable() hooks the vision tower's input embeddings (the patch
    conv, or Qwen's patch embed itself) so their output requires grad for frozen weights: so it
    does after the patch, whichever came first, and a checkpointed training step gives HF's
    gradients; disable_input_require_grads() removes the hook again."""
    model, inputs = _model(name)
    patched = copy.deepcopy(model)
    for m in (model, patched):
        if enable_first or m is model:
            m.activation_checkpointing_enable()
    report = vhf.patch_model(patched)
    if not enable_first:
        patched.activation_checkpointing_enable()
    assert not report.skipped, str(report)
    assert type(_input_embeddings(patched)).__module__.startswith("vlmkern.")

    def requires_grad(m) -> bool:
        embeddings = _input_embeddings(m)
        for p in embeddings.parameters():
            p.requires_grad_(False)
        out = embeddings(inputs["pixel_values"]).requires_grad
        for p in embeddings.parameters():
            p.requires_grad_(True)
        return out

    # HF hooks the vision tower's input embeddings where it has get_input_embeddings (not
    # Qwen3-VL's): the patched model does what HF's does
    assert requires_grad(patched) == requires_grad(model) == (name != "qwen3_vl")
    grads = []
    for m in (model, patched):
        m.train()
        m(**inputs).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert_grads_close(grads[1], grads[0])
    patched.disable_input_require_grads()
    assert not requires_grad(patched)


def test_qwen_vision_attentions_are_captured():
    """HF records the ViT attention modules' outputs by class hooks; they move to vlmkern's."""
    model, inputs = _model("qwen2_vl")
    patched = copy.deepcopy(model)
    args = (inputs["pixel_values"],)
    kw = dict(grid_thw=inputs["image_grid_thw"], output_attentions=True)
    with torch.no_grad():
        expected = model.model.visual(*args, **kw).attentions
        vhf.patch_model(patched)
        got = patched.model.visual(*args, **kw).attentions
    assert expected and len(got) == len(expected)
    assert max(rel(g, e) for g, e in zip(got, expected, strict=True)) <= 1e-5


def test_mllama_gradient_checkpointing_carries_over():
    model, inputs = _model("mllama")
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
    model, inputs = _model("mllama")
    vhf.patch_model(model)
    layer = model.model.language_model.layers[1]
    assert layer.num_vision_tokens == MLLAMA_TILE_TOKENS
    x = torch.randn(2, 7, 256)
    states = inputs["cross_attention_states"]
    bad = torch.zeros(2, 1, 7, states.shape[1] - 1)
    with pytest.raises(ValueError, match="tiles of 5 keys"):
        layer(x, states, bad, None, None)
    with pytest.raises(ValueError, match="needs cross_attention_states or a cache"):
        layer(x, None, None, None, None)


def test_hooked_or_adapted_modules_are_left_alone():
    model, inputs = _model("llava")
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


class _ScaledLinear(torch.nn.Linear):  # a Linear subclass with its own forward
    def forward(self, x):
        return 2 * super().forward(x)


class _Int8Like(torch.nn.Parameter):  # a tensor-subclass weight (quantized weights are such)
    pass


def test_linear_and_parameter_subclasses_are_left_alone():
    model, _ = _model("llava")
    proj = model.model.multi_modal_projector
    scaled = _ScaledLinear(proj.linear_1.in_features, proj.linear_1.out_features)
    scaled.load_state_dict(proj.linear_1.state_dict())
    proj.linear_1 = scaled
    conv = model.model.vision_tower.embeddings.patch_embedding
    conv.weight = _Int8Like(conv.weight.detach())
    report = vhf.patch_model(model)
    assert not report.replaced
    why = {p: w for p, _, w in report.skipped}
    assert "_ScaledLinear" in why["model.multi_modal_projector"]
    assert "_Int8Like" in why["model.vision_tower.embeddings"]


def test_mllama_eager_attention_is_not_swapped():
    """HF's eager attention returns the weights output_attentions records; vlmkern's does not."""
    model, _ = _model("mllama")
    model.set_attn_implementation("eager")
    report = vhf.patch_model(model)
    assert not report.replaced
    assert "eager" in report.skipped[0][2]


def test_flop_counter_runs_on_a_patched_model():
    """FlopCounterMode's global module hooks: the vlmkern modules run (no unfused fallback
    needed), and the model's GEMMs are still counted."""
    from torch.utils.flop_counter import FlopCounterMode

    model, inputs = _model("llava")
    vhf.patch_model(model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    assert counter.get_total_flops() > 0


def test_nothing_to_replace_leaves_the_model_picklable():
    import pickle

    model, _ = _model("llava")
    vhf.patch_model(model, connectors=False, embeddings=False, cross_attention=False,
                    vision_attention=False, rope=False)
    pickle.dumps(model)


def test_mllama_attention_dropout_is_not_swapped():
    model, _ = _model("mllama")
    model.model.language_model.layers[1].cross_attn.dropout = 0.1
    report = vhf.patch_model(model)
    assert not report.replaced
    assert "dropout" in report.skipped[0][2]


def test_switches_choose_what_is_patched():
    model, _ = _model("qwen2_vl")
    report = vhf.patch_model(model, embeddings=False, vision_attention=False, rope=False)
    assert [p for p, _, _ in report.replaced] == ["model.visual.merger"]
    assert not report.functions
    assert "1 modules replaced, 0 functions patched" in str(report)


def test_function_patches_are_undone():
    from transformers.models.qwen2_vl import modeling_qwen2_vl as mod

    hf_fn = mod.apply_rotary_pos_emb_vision
    model, _ = _model("qwen2_vl")
    report = vhf.patch_model(model)
    assert f"{mod.__name__}.apply_rotary_pos_emb_vision" in report.functions
    assert mod.apply_rotary_pos_emb_vision is not hf_fn
    internvl, _ = _model("internvl")
    assert "model.pixel_shuffle" in vhf.patch_model(internvl).functions
    assert "pixel_shuffle" in vars(internvl.model)
    vhf.unpatch_functions()
    assert mod.apply_rotary_pos_emb_vision is hf_fn
    assert "pixel_shuffle" not in vars(internvl.model)


def test_patched_layers_compile_without_graph_breaks():
    """The swapped-in Mllama layer (HF's dense mask read back as ranges) and Qwen ViT attention
    under torch.compile(fullgraph=True)."""
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    model, inputs = _model("mllama")
    vhf.patch_model(model)
    layer = model.model.language_model.layers[1]
    mask, rows = _prepare_cross_attention_mask(inputs["cross_attention_mask"],
                                               MLLAMA_TILE_TOKENS, torch.float32)
    x, states = torch.randn(2, 7, 256), inputs["cross_attention_states"]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, states, mask, None, rows),
                                   layer(x, states, mask, None, rows))

    model, _ = _model("qwen2_vl")
    vhf.patch_model(model)
    attn = model.model.visual.blocks[0].attn
    x = torch.randn(28, 32)
    cu = torch.tensor([0, 24, 28], dtype=torch.int32)
    angles = torch.randn(28, 4)
    pe = (torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin())
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, cu, pe), attn(x, cu, pe))


def test_qwen_vit_attention_under_flash_attention_is_left_to_hf():
    """With flash_attention_2 requested HF's ViT already runs one varlen call per layer."""
    model, _ = _model("qwen2_vl")
    model.model.visual.config._attn_implementation = "flash_attention_2"
    report = vhf.patch_model(model)
    skipped = {p: w for p, _, w in report.skipped}
    assert set(skipped) == {"model.visual.blocks.0.attn", "model.visual.blocks.1.attn"}
    assert all("varlen" in w for w in skipped.values())
