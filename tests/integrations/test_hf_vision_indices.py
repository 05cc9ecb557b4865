"""patch_model's pre-hook on the Qwen-family ViTs: HF's forward handed its index tensors from
vlmkern.ops.vision_grid. The patched towers (Qwen2-VL, 2.5-VL with windows, 3-VL with its
position table, Qwen2.5-Omni) compile with fullgraph and no host read, match HF, hold no
reference cycle, and on CUDA run without a host sync and replay in a CUDA graph (auto-skipped
without a GPU)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import transformers as T
from hf_models import MODELS, rel, vision_encoder
from testing_utils import compile_recording, graph_replay, no_host_sync, sync_points

pytest.importorskip("transformers")
from vlmkern.integrations import hf as vhf  # noqa: E402
from vlmkern.integrations.hf_methods import _VisionIndices  # noqa: E402
from vlmkern.ops import vision_grid  # noqa: E402

GRID = [[1, 8, 6], [2, 4, 4], [1, 2, 2]]  # an image with 2 x 2 windows, a 2-frame video, a tiny one


@pytest.fixture(autouse=True)
def _restore_functions():
    yield
    vhf.unpatch_functions()


def _tower(name: str) -> torch.nn.Module:
    if name == "qwen2_5_omni":
        return vision_encoder(name).eval()
    model, _ = MODELS[name]()
    return model.model.visual.eval()


def _inputs(tower: torch.nn.Module, device: str = "cpu", dtype=torch.float32):
    grid = torch.tensor(GRID, device=device)
    patch = tower.config.patch_size
    rows = int(grid.prod(-1).sum())
    return torch.randn(rows, 3 * 2 * patch * patch, device=device, dtype=dtype), grid


def _out(result) -> torch.Tensor:
    return getattr(result, "pooler_output", result)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen2_5_omni", "qwen3_vl",
                                  "qwen3_vl_moe"])
def test_patched_tower_compiles_without_host_reads(name):
    """HF's tower reads grid_thw on the host (item() calls in the graph; Qwen2.5-VL's windows
    broke the graph); the patched one is a single graph with none, and matches HF's output."""
    tower = _tower(name)
    pixels, grid = _inputs(tower)
    with torch.no_grad():
        expected = _out(tower(pixels, grid_thw=grid))
    report = vhf.patch_model(tower)
    assert "<root>.forward (pre-hook: vision_grid indices)" in report.functions, str(report)
    compiled, graphs = compile_recording(tower)
    with torch.no_grad():
        got = _out(compiled(pixels, grid_thw=grid))
    assert rel(got, expected) <= 1e-5
    assert graphs and all(not sync_points(g) for g in graphs)


def _hooked(tower: torch.nn.Module) -> int:
    return sum(isinstance(h, _VisionIndices) for h in tower._forward_pre_hooks.values())


def test_tower_hook_follows_the_switches():
    """Installed with vision_attention (listed) once however often patch_model runs, removed by
    unpatch_functions, absent without the switch."""
    model, _ = MODELS["qwen2_5_vl"]()
    report = vhf.patch_model(model)
    vhf.patch_model(model)
    assert "model.visual.forward (pre-hook: vision_grid indices)" in report.functions
    assert _hooked(model.model.visual) == 1
    vhf.unpatch_functions()
    assert _hooked(model.model.visual) == 0

    model, _ = MODELS["qwen2_5_vl"]()
    vhf.patch_model(model, vision_attention=False)
    assert _hooked(model.model.visual) == 0


def test_patched_tower_is_freed_on_del():
    """No reference cycle: dropping the last reference frees the weights at once."""
    tower = _hd64_tower("qwen2_5_vl")
    vhf.patch_model(tower)
    weight = weakref.ref(tower.blocks[0].attn.qkv.weight)
    gc.disable()
    try:
        del tower
        assert weight() is None
    finally:
        gc.enable()


def test_hf_attention_in_a_block_keeps_hfs_indices(monkeypatch):
    tower = _tower("qwen2_5_vl")
    pixels, grid = _inputs(tower)
    hf_attention = copy.deepcopy(tower.blocks[1].attn)
    with torch.no_grad():
        expected = _out(tower(pixels, grid_thw=grid))
    vhf.patch_model(tower)
    tower.blocks[1].attn = hf_attention

    def refuse(*args, **kwargs):
        raise AssertionError("vision_grid used with an HF attention block")

    monkeypatch.setattr(vision_grid, "vision_cu_seqlens", refuse)
    with torch.no_grad():
        assert rel(_out(tower(pixels, grid_thw=grid)), expected) <= 1e-5


def test_caller_indices_win(monkeypatch):
    """Index tensors the caller passes reach HF's forward unchanged; the others are filled."""
    tower = _tower("qwen2_vl")
    pixels, grid = _inputs(tower)
    vhf.patch_model(tower)
    hf_forward, seen = type(tower).forward, {}

    def record(self, hidden_states, grid_thw, **kwargs):
        seen.update(kwargs)
        return hf_forward(self, hidden_states, grid_thw, **kwargs)

    monkeypatch.setattr(type(tower), "forward", record)
    zeros = torch.zeros(pixels.shape[0], 2, dtype=torch.long)
    with torch.no_grad():
        tower(pixels, grid_thw=grid, position_ids=zeros)
    assert seen["position_ids"] is zeros
    torch.testing.assert_close(seen["cu_seqlens"], vision_grid.vision_cu_seqlens(
        grid, pixels.shape[0], exact=True), rtol=0, atol=0)


def test_padded_indices_in_eager_match_exact():
    """The fixed-length boundaries (what CUDA and compile get) in an eager CPU forward."""
    tower = _tower("qwen2_5_vl")
    pixels, grid = _inputs(tower)
    with torch.no_grad():
        expected = _out(tower(pixels, grid_thw=grid))
    vhf.patch_model(tower)
    given = vhf.vision_indices(tower, grid, pixels.shape[0])
    assert given["cu_seqlens"].shape == (pixels.shape[0] + 1,)
    with torch.no_grad():
        got = _out(tower(pixels, grid_thw=grid, **given))
    assert rel(got, expected) <= 1e-5


def _hd64_tower(name: str) -> torch.nn.Module:
    """A standalone tower with head dim 64 (one the CUDA kernels take)."""
    vision = dict(depth=2, num_heads=2, spatial_merge_size=2, temporal_patch_size=2)
    if name == "qwen2_vl":
        cfg = T.Qwen2VLVisionConfig(**vision, embed_dim=128, hidden_size=64, mlp_ratio=2,
                                    patch_size=14)
        cls = T.models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel
    else:
        cfg = T.Qwen2_5_VLVisionConfig(**vision, hidden_size=128, intermediate_size=256,
                                       out_hidden_size=64, patch_size=14, window_size=56,
                                       fullatt_block_indexes=[1])
        cls = T.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel
    return cls(cfg).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_cuda_patched_tower_without_host_sync_in_a_cuda_graph(name):
    tower = _hd64_tower(name).to("cuda", torch.bfloat16)
    pixels, grid = _inputs(tower, "cuda", torch.bfloat16)
    with torch.no_grad():
        reference = _out(copy.deepcopy(tower).double()(pixels.double(), grid_thw=grid))
        hf = _out(tower(pixels, grid_thw=grid))
    vhf.patch_model(tower)
    with torch.no_grad():
        with no_host_sync():
            eager = _out(tower(pixels, grid_thw=grid))
        assert rel(eager, reference) <= 2 * rel(hf, reference) + 1e-3
        static = graph_replay(lambda: _out(tower(pixels, grid_thw=grid)))
    assert rel(static, eager) <= 1e-3
