"""vlmkern.models.qwen_vision against HF's Qwen2-VL / 2.5-VL / 3-VL vision towers (tiny, random):
outputs and gradients in fp32, bf16 by the 2x rule, state-dict round trips, one compiled graph
without host reads, input errors, and on CUDA (auto-skipped without one) bf16 + graph replay."""

from __future__ import annotations

import copy

import pytest
import torch
from testing_utils import (
    assert_nontrivial,
    compile_recording,
    graph_replay,
    no_host_sync,
    sync_points,
)

T = pytest.importorskip("transformers")
from integrations.hf_models import MODELS, assert_grads_close, rel  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import (  # noqa: E402
    Qwen2VisionTransformerPretrainedModel,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel  # noqa: E402

from vlmkern.models.qwen_vision import (  # noqa: E402
    Qwen2_5_VLVisionTransformer,
    Qwen2VLVisionTransformer,
    Qwen3VLVisionTransformer,
)

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
OURS = {"qwen2_vl": Qwen2VLVisionTransformer, "qwen2_5_vl": Qwen2_5_VLVisionTransformer,
        "qwen3_vl": Qwen3VLVisionTransformer}
# an 8x6 image (2x2 windows of 2x2 merged tokens, the right ones cut), a 2-frame video, a tiny one
GRID = [[1, 8, 6], [2, 4, 4], [1, 2, 2]]
PATCH = 4


def _hf(family: str, dim: int = 32, heads: int = 4) -> torch.nn.Module:
    """A 3-block HF tower (Qwen2.5-VL: window, full, window attention; Qwen3-VL: DeepStack
    features after blocks 0 and 1, a 4x4 position table) with random weights at
    unit scale (HF's init leaves biases at 0 and norm weights at 1, which would hide them), the
    patch embedding's at 0.1 (small tokens: the first norm's eps shows)."""
    vis = dict(depth=3, num_heads=heads, spatial_merge_size=2, temporal_patch_size=2,
               in_channels=3, patch_size=PATCH)
    if family == "qwen2_vl":
        cfg = T.Qwen2VLVisionConfig(**vis, embed_dim=dim, hidden_size=48, mlp_ratio=2)
        tower = Qwen2VisionTransformerPretrainedModel(cfg)
    elif family == "qwen3_vl":
        cfg = T.Qwen3VLVisionConfig(**vis, hidden_size=dim, out_hidden_size=48,
                                    intermediate_size=2 * dim, num_position_embeddings=16,
                                    deepstack_visual_indexes=[0, 1])
        tower = Qwen3VLVisionModel(cfg)
    else:
        cfg = T.Qwen2_5_VLVisionConfig(**vis, hidden_size=dim, out_hidden_size=48,
                                       intermediate_size=2 * dim, window_size=2 * 2 * PATCH,
                                       fullatt_block_indexes=[1])
        tower = Qwen2_5_VisionTransformerPretrainedModel(cfg)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5 * (0.1 if "patch_embed" in name else 1))
            elif "norm" in name or "ln_q" in name:
                p.normal_(1, 0.1)
            else:
                p.normal_(0, 0.1)
    return tower.eval()


def _inputs(grid=GRID, device="cpu", dtype=torch.float32):
    grid = torch.tensor(grid, device=device)
    rows = int(grid.prod(-1).sum())
    return torch.randn(rows, 3 * 2 * PATCH * PATCH, device=device, dtype=dtype), grid


def _hf_out(tower, pixels, grid) -> tuple[torch.Tensor, ...]:
    """(pooler_output, last_hidden_state, *deepstack_features)."""
    out = tower(pixels, grid_thw=grid)
    return out.pooler_output, out.last_hidden_state, *(getattr(out, "deepstack_features", ()))


def _ours(tower):
    """forward_features with Qwen3-VL's DeepStack tuple flattened (HF's order)."""
    def run(pixels, grid) -> tuple[torch.Tensor, ...]:
        merged, hidden, *deepstack = tower.forward_features(pixels, grid)
        return merged, hidden, *(deepstack[0] if deepstack else ())
    return run


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_hf_fp32(family):
    """Images of several grids and a video packed in one call: the merged output, the last
    hidden state (Qwen2.5-VL's in HF's window order) and Qwen3-VL's DeepStack features within
    1e-5 of HF's."""
    hf = _hf(family)
    ours = OURS[family].from_hf(hf)
    pixels, grid = _inputs()
    with torch.no_grad():
        refs = _hf_out(hf, pixels, grid)
        got = _ours(ours)(pixels, grid)
        plain = ours(pixels, grid)
    assert len(got) == len(refs) == (4 if family == "qwen3_vl" else 2)
    assert got[0].shape == (pixels.shape[0] // 4, 48) and got[1].shape == (pixels.shape[0], 32)
    for out, ref in zip(got, refs, strict=True):
        assert_nontrivial(ref)
        assert rel(out, ref) <= 1e-5
    assert torch.equal(plain, got[0])


def test_windows_and_frames_matter():
    """The reference is sensitive to the segments: the same tower with every block attending
    over whole frames (no windows) gives another output, as does a video read as one image."""
    hf = _hf("qwen2_5_vl")
    ours = Qwen2_5_VLVisionTransformer.from_hf(hf)
    pixels, grid = _inputs()
    with torch.no_grad():
        expected = ours(pixels, grid)
        ours.fullatt_block_indexes = (0, 1, 2)
        assert rel(ours(pixels, grid), expected) > 1e-2
        ours = Qwen2VLVisionTransformer.from_hf(_hf("qwen2_vl"))
        one_image = torch.tensor([[1, 8, 6], [1, 8, 4], [1, 2, 2]])
        assert rel(ours(pixels, one_image), ours(pixels, grid)) > 1e-2


def test_qwen3_vl_moe_tower():
    """Qwen3-VL-MoE's tower (its own HF class, Qwen3-VL's keys) from hf_models' tiny model:
    patch size 16, two images."""
    model, inputs = MODELS["qwen3_vl_moe"]()
    hf = model.model.visual.eval()
    ours = Qwen3VLVisionTransformer.from_hf(hf)
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        refs, got = _hf_out(hf, pixels, grid), _ours(ours)(pixels, grid)
    assert len(got) == len(refs) == 3
    for out, ref in zip(got, refs, strict=True):
        assert_nontrivial(ref)
        assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip(family):
    """Our keys are HF's: strict loads both ways, and an HF tower loaded from ours computes what
    the original did. ``from_hf`` copies weights, dtype, device and mode; the RoPE table
    (non-persistent, as HF's) keeps HF's fp32 values through a cast."""
    hf = _hf(family)
    ours = OURS[family](hf.config)
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(hf.state_dict())
    back = type(hf)(hf.config).eval()
    back.load_state_dict(ours.state_dict(), strict=True)
    pixels, grid = _inputs()
    with torch.no_grad():
        assert torch.equal(_hf_out(back, pixels, grid)[0], _hf_out(hf, pixels, grid)[0])

    copied = OURS[family].from_hf(hf.train())
    assert copied.training
    for name, value in hf.state_dict().items():
        assert torch.equal(copied.state_dict()[name], value), name
    assert copied.blocks[0].attn.qkv.weight.data_ptr() != hf.blocks[0].attn.qkv.weight.data_ptr()
    half = OURS[family].from_hf(copy.deepcopy(hf).to(torch.bfloat16))
    assert next(half.parameters()).dtype == torch.bfloat16
    assert half.rotary_pos_emb.inv_freq.dtype == torch.float32
    assert torch.equal(half.rotary_pos_emb.inv_freq, hf.rotary_pos_emb.inv_freq)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_within_twice_hfs_error(family):
    """G3b: in bf16, ours is at most 2x as far from HF's fp32 output as HF's own bf16 tower."""
    hf = _hf(family)
    pixels, grid = _inputs()
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    ours = OURS[family].from_hf(hf_bf16)
    with torch.no_grad():
        refs = _hf_out(hf, pixels, grid)
        low = _hf_out(hf_bf16, pixels.bfloat16(), grid)
        got = _ours(ours)(pixels.bfloat16(), grid)
    for out, pt, ref in zip(got, low, refs, strict=True):
        assert out.dtype == torch.bfloat16
        assert_nontrivial(ref)
        assert rel(out, ref) <= 2 * rel(pt, ref) + 1e-3


def _loss(*outputs: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return sum((t * torch.randn(t.shape, generator=gen).to(t)).sum() for t in outputs)


def _grads(tower, forward, pixels, grid) -> tuple[torch.Tensor, dict]:
    tower.zero_grad(set_to_none=True)
    x = pixels.clone().requires_grad_()
    _loss(*forward(x, grid)).backward()
    return x.grad, {n: p.grad for n, p in tower.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_hf_fp32(family):
    """The pixel gradient and every parameter's, through every output."""
    hf = _hf(family)
    ours = OURS[family].from_hf(hf)
    pixels, grid = _inputs()
    ref_pixels, ref = _grads(hf, lambda x, g: _hf_out(hf, x, g), pixels, grid)
    got_pixels, got = _grads(ours, _ours(ours), pixels, grid)
    assert_nontrivial(ref_pixels)
    assert all(g is not None for g in ref.values()) and all(g is not None for g in got.values())
    assert rel(got_pixels, ref_pixels) <= 1e-4
    assert_grads_close(got, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiles_to_one_graph_without_host_reads(family):
    """fullgraph compile (aot_eager) equals eager, forward and backward; the dynamo graph reads
    nothing on the host, and a second grid of another patch count adds at most one graph."""
    ours = OURS[family].from_hf(_hf(family))
    pixels, grid = _inputs()
    eager_pixels, eager = _grads(ours, _ours(ours), pixels, grid)
    compiled = torch.compile(_ours(ours), fullgraph=True, backend="aot_eager")
    got_pixels, got = _grads(ours, compiled, pixels, grid)
    assert rel(got_pixels, eager_pixels) <= 1e-6
    assert_grads_close(got, eager, rtol=1e-6)

    recording, graphs = compile_recording(ours)
    other = _inputs([[1, 4, 8], [1, 6, 6]])
    with torch.no_grad():
        for x, g in ((pixels, grid), other):
            expected = ours(x, g)
            assert_nontrivial(expected)
            assert rel(recording(x, g), expected) <= 1e-6
    assert 1 <= len(graphs) <= 2
    assert all(not sync_points(g) for g in graphs)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_inputs_raise(family):
    ours = OURS[family].from_hf(_hf(family))
    pixels, grid = _inputs()
    cases = [
        (pixels[:, :-1], grid, "pixel_values must be \\(N, C\\*T\\*P\\*P\\) = \\(N, 96\\)"),
        (pixels.reshape(-1, 4, 24), grid, "pixel_values must be"),
        (pixels[:-4], grid, "rows must equal grid_thw's patches.*80 rows, 84 patches"),
        (pixels[:-2], grid, "82 pixel rows are not a whole number of 2x2 merge blocks"),
        (pixels[:12], torch.tensor([[1, 3, 4]]), "h and w must be divisible by "
                                                  "spatial_merge_size=2"),
        (pixels, grid.float(), "grid_thw must be \\(images, 3\\) int32 / int64"),
        (pixels, grid[:, :2], "grid_thw must be \\(images, 3\\)"),
    ]
    for x, g, match in cases:
        with pytest.raises(ValueError, match=match):
            ours(x, g)


def test_patch_count_is_checked_on_the_device_under_compile():
    """Compiled (and on CUDA) the count is not read on the host: a device-side assert fires."""
    ours = Qwen2VLVisionTransformer.from_hf(_hf("qwen2_vl"))
    pixels, grid = _inputs()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), pytest.raises(RuntimeError, match="rows must equal grid_thw's patches"):
        compiled(pixels[:-4], grid)


@pytest.mark.parametrize("family, path", [("qwen2_vl", "blocks.1.mlp.fc1"),
                                          ("qwen3_vl", "blocks.0.mlp.linear_fc1"),
                                          ("qwen3_vl", "pos_embed")])
def test_hooked_layers_run_unfused(family, path):
    """A forward hook on a Linear the MLP fuses or on Qwen3-VL's position table (what a PEFT
    adapter looks like) is called, not bypassed by the fused op, and the result is unchanged."""
    hf = _hf(family)
    ours = OURS[family].from_hf(hf)
    pixels, grid = _inputs()
    calls = []
    ours.get_submodule(path).register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        assert rel(ours(pixels, grid), _hf_out(hf, pixels, grid)[0]) <= 1e-5
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head_dim", [64, 72, 80])  # kernel head dims; 80 Qwen2/2.5, 72 Qwen3
def test_cuda_bf16_without_host_sync_in_a_cuda_graph(family, head_dim):
    """Head dims the CUDA attention kernels take: bf16 within 2x HF bf16's error of HF in fp64,
    no host sync in eager, and a CUDA-graph replay equal to eager."""
    hf = _hf(family, dim=2 * head_dim, heads=2).to("cuda")
    pixels, grid = _inputs(device="cuda")
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    ours = OURS[family].from_hf(hf_bf16)
    x = pixels.bfloat16()
    with torch.no_grad():
        reference = _hf_out(copy.deepcopy(hf).double(), pixels.double(), grid)[0]
        low = _hf_out(hf_bf16, x, grid)[0]
        with no_host_sync():
            eager = ours(x, grid)
        assert_nontrivial(reference)
        assert rel(eager, reference) <= 2 * rel(low, reference) + 1e-3
        static = graph_replay(lambda: ours(x, grid))
    assert rel(static, eager) <= 1e-3
