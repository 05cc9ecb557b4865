"""patch_model on the BLIP-2 / InstructBLIP(-Video) Q-Former attention: the vlmkern kernel where
there is no mask and no dropout, HF's attention function for instruction-text padding masks,
training-time dropout and fp32 on CUDA; outputs and gradients HF's in each case. (The whole
BLIP-2 model is also in hf_models.MODELS, under every generic drop-in test.)"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from hf_models import assert_grads_close, rel, vlmkern_calls

pytest.importorskip("transformers")
from vlmkern.integrations import hf as vhf  # noqa: E402


def _kernel_calls(fn) -> int:
    """vlmkern cross_attention calls while fn() runs (without autograd)."""
    with torch.no_grad():
        return vlmkern_calls(fn)["cross_attention"]


def _qformer(family: str, dropout: float = 0.0, implementation: str = "sdpa"):
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    config_module = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    prefix = {"blip_2": "Blip2", "instructblip": "InstructBlip",
              "instructblipvideo": "InstructBlipVideo"}[family]
    cfg = getattr(config_module, f"{prefix}QFormerConfig")(
        hidden_size=128, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
        encoder_hidden_size=48, cross_attention_frequency=1, vocab_size=100,
        attention_probs_dropout_prob=dropout, hidden_dropout_prob=0.0)
    cfg._attn_implementation = implementation
    return getattr(module, f"{prefix}QFormerModel")(cfg).eval()


def _inputs(family: str, padded: bool) -> dict:
    """4 learned queries for 3 images of 9 tokens; InstructBLIP adds 5 instruction tokens, right
    padded on two rows when ``padded`` (BLIP-2: a padded image mask instead)."""
    out = dict(query_embeds=torch.randn(3, 4, 128), encoder_hidden_states=torch.randn(3, 9, 48))
    if family == "blip_2":
        if padded:
            out["encoder_attention_mask"] = torch.tensor([[1] * 9, [1] * 6 + [0] * 3,
                                                          [1] * 2 + [0] * 7])
        return out
    text = torch.ones(3, 5, dtype=torch.long)
    if padded:
        text[1, 3:] = text[2, 1:] = 0
    return dict(out, input_ids=torch.randint(1, 100, (3, 5)),
                attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), text], 1))


def _run(model: torch.nn.Module, inputs: dict, seed: int = 0):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(**inputs).last_hidden_state
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", ["blip_2", "instructblip", "instructblipvideo"])
def test_qformer_matches_hf(family, padded):
    hf = _qformer(family)
    patched = copy.deepcopy(hf)
    inputs = _inputs(family, padded)
    expected, expected_grads = _run(hf, inputs)
    report = vhf.patch_model(patched)
    assert len(report.replaced) == 4 and not report.skipped, str(report)
    got, grads = _run(patched, inputs)
    assert rel(got, expected) <= 1e-5
    assert_grads_close(grads, expected_grads)
    # 2 layers x (self, cross); a padding mask sends one of each layer's two to HF's function:
    # BLIP-2's image mask the cross-attention, InstructBLIP's text mask the self-attention
    assert _kernel_calls(lambda: patched(**inputs)) == (2 if padded else 4)


def test_training_dropout_is_hfs():
    """Attention dropout in training runs HF's attention function: the same random draws."""
    hf = _qformer("blip_2", dropout=0.3).train()
    patched = copy.deepcopy(hf)
    inputs = _inputs("blip_2", False)
    expected, expected_grads = _run(hf, inputs, seed=5)
    vhf.patch_model(patched)
    got, grads = _run(patched, inputs, seed=5)
    assert rel(got, expected) <= 1e-6
    assert_grads_close(grads, expected_grads)
    patched.eval()  # no dropout in eval: the kernel again
    assert _kernel_calls(lambda: patched(**inputs)) == 4


def test_eager_qformer_is_left_to_hf():
    model = _qformer("blip_2", implementation="eager")
    report = vhf.patch_model(model)
    assert not report.replaced and len(report.skipped) == 4
    assert all("attention weights" in why for _, _, why in report.skipped)


def test_one_image_state_broadcast_over_query_batch():
    """HF's matmuls broadcast a batch of one on either side; so does the adapter."""
    hf = _qformer("blip_2")
    patched = copy.deepcopy(hf)
    vhf.patch_model(patched)
    for queries, image in ((3, 1), (1, 3)):
        inputs = dict(query_embeds=torch.randn(queries, 4, 128),
                      encoder_hidden_states=torch.randn(image, 9, 48))
        with torch.no_grad():
            assert rel(patched(**inputs).last_hidden_state,
                       hf(**inputs).last_hidden_state) <= 1e-5


def test_eager_chosen_after_the_patch_records_weights():
    hf = _qformer("blip_2")
    patched = copy.deepcopy(hf)
    vhf.patch_model(patched)
    inputs = _inputs("blip_2", False)
    for m in (hf, patched):
        m.set_attn_implementation("eager")
    with torch.no_grad():
        expected = hf(**inputs, output_attentions=True)
        got = patched(**inputs, output_attentions=True)
    assert len(got.attentions) == len(expected.attentions) > 0
    assert max(rel(g, e) for g, e in zip(got.attentions, expected.attentions, strict=True)) \
        <= 1e-5
    assert rel(got.last_hidden_state, expected.last_hidden_state) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_in_bf16_hfs_way_in_fp32(dtype):
    """BLIP-2 keeps its Q-Former in fp32, where the CUDA kernels do not run (HF's SDPA does);
    in bf16 the kernel runs, within 2x HF's own error against float64."""
    hf = _qformer("blip_2").cuda()
    inputs = {k: v.cuda() for k, v in _inputs("blip_2", False).items()}
    with torch.no_grad():
        reference = copy.deepcopy(hf).double()(
            **{k: v.double() for k, v in inputs.items()}).last_hidden_state
        low = {k: v.to(dtype) for k, v in inputs.items()}
        hf = hf.to(dtype)
        expected = hf(**low).last_hidden_state
        patched = copy.deepcopy(hf)
        vhf.patch_model(patched)
        got = patched(**low).last_hidden_state
        calls = _kernel_calls(lambda: patched(**low))
    assert rel(got, reference) <= 2 * rel(expected, reference) + 1e-6
    assert calls == (4 if dtype == torch.bfloat16 else 0)
