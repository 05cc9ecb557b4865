"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers built from vlmkern ops and modules: HF's
state-dict keys and outputs, every index tensor computed on the device by vision_grid (no sync)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn._fusable import fusable
from ..nn.patch_embed import Qwen2VLPatchEmbed, _Qwen3Proj
from ..nn.projector import (
    Qwen2_5_VLPatchMerger,
    Qwen2VLPatchMerger,
    Qwen3VLVisionPatchMerger,
    QwenRMSNorm,
    activation_from_hf,
)
from ..nn.vision_attention import QwenVisionAttention
from ..ops.patch_embed import patch_embed
from ..ops.vision_grid import (
    vision_cu_seqlens,
    vision_interp_taps,
    vision_position_ids,
    vision_window_index,
)
from ..reference.mlp_projector import activation_fn
from ._common import copy_of, residual_norm_mlp

RopeTables = tuple[torch.Tensor, torch.Tensor]
# HF ACT2FN names the gated MLP takes; others go through the mlp_projector activations' table.
_GATE_ACTS = {"silu": F.silu, "swish": F.silu}


def _rope_theta(config: Any) -> float:
    return float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))


class _VisionRotaryTable(nn.Module):
    """HF's ``Qwen2VLVisionRotaryEmbedding``: fp32 ``inv_freq`` (a non-persistent buffer, as HF's)
    → ``(cos, sin)`` ``(N, head_dim)`` fp32 for (row, col) positions ``(N, 2)`` int, laid out
    ``[f_h, f_w, f_h, f_w]``. The buffer stays HF's exact fp32 values through ``.to(dtype)``."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"vlmkern.models: the ViT's head dim must be divisible by 4 (2D "
                             f"RoPE), got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._table(torch.get_default_device()),
                             persistent=False)

    def _table(self, device: torch.device) -> torch.Tensor:
        """HF's values (computed on the CPU in fp32), (head_dim / 4,) on ``device``."""
        half = self.head_dim // 2
        arange = torch.arange(0, half, 2, dtype=torch.float, device="cpu")
        return (1.0 / (self.theta ** (arange / half))).to(device)

    def _apply(self, fn, recurse: bool = True):  # device moves only: never cast the table
        super()._apply(fn, recurse)
        self.inv_freq = self._table(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor) -> RopeTables:
        freqs = (position_ids[..., None].float() * self.inv_freq).flatten(1)  # (N, head_dim / 2)
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos(), emb.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


class _VisionMlp(nn.Module):
    """Qwen2-VL's ``VisionMlp`` parameters (``fc1``, ``fc2``); run by its block (fused with the
    block's norm2 by mlp_projector)."""

    def __init__(self, dim: int, hidden_dim: int, hidden_act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.activation = activation_from_hf(hidden_act)

    def layers(self) -> tuple[nn.Linear, nn.Linear]:
        return self.fc1, self.fc2


class _Qwen3VisionMlp(_VisionMlp):
    """Qwen3-VL's ``Qwen3VLVisionMLP`` parameters (``linear_fc1``, ``linear_fc2``)."""

    def __init__(self, dim: int, hidden_dim: int, hidden_act: str) -> None:
        nn.Module.__init__(self)
        self.linear_fc1 = nn.Linear(dim, hidden_dim)
        self.linear_fc2 = nn.Linear(hidden_dim, dim)
        self.activation = activation_from_hf(hidden_act)

    def layers(self) -> tuple[nn.Linear, nn.Linear]:
        return self.linear_fc1, self.linear_fc2


class _GatedMlp(nn.Module):
    """Qwen2.5-VL's ``Qwen2_5_VLMLP``: ``down(act(gate(x)) · up(x))``, ``(N, D)`` → ``(N, D)``."""

    def __init__(self, dim: int, hidden_dim: int, hidden_act: str, bias: bool = True) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.hidden_act = hidden_act
        self.activation = None if hidden_act in _GATE_ACTS else activation_from_hf(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = (_GATE_ACTS[self.hidden_act](gate) if self.activation is None
                else activation_fn(gate, self.activation))
        return self.down_proj(gate * self.up_proj(x))


class _LayerNormBlock(nn.Module):
    """``x + attn(norm1(x))`` then ``x + fc2(act(fc1(norm2(x))))``, the second as one
    mlp_projector (LayerNorm prologue). ``forward(hidden_states (N, D), cu_seqlens (S + 1,)
    int32, position_embeddings (cos, sin) (N, head_dim) fp32) -> (N, D)``."""

    def __init__(self, dim: int, num_heads: int, mlp: _VisionMlp) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = QwenVisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: RopeTables) -> torch.Tensor:
        x = hidden_states + self.attn(self.norm1(hidden_states), cu_seqlens, position_embeddings)
        return residual_norm_mlp(x, self.norm2, *self.mlp.layers(), self.mlp.activation)


class Qwen2VLVisionBlock(_LayerNormBlock):
    """HF's ``Qwen2VLVisionBlock`` (MLP ``fc1`` / ``fc2``, quick GELU); forward as
    :class:`_LayerNormBlock`."""

    def __init__(self, config: Any) -> None:
        dim = config.embed_dim
        super().__init__(dim, config.num_heads,
                         _VisionMlp(dim, int(dim * config.mlp_ratio), config.hidden_act))


class Qwen3VLVisionBlock(_LayerNormBlock):
    """HF's ``Qwen3VLVisionBlock`` (MLP ``linear_fc1`` / ``linear_fc2``, tanh GELU)."""

    def __init__(self, config: Any) -> None:
        dim = config.hidden_size
        super().__init__(dim, config.num_heads,
                         _Qwen3VisionMlp(dim, config.intermediate_size, config.hidden_act))


class Qwen2_5_VLVisionBlock(nn.Module):  # noqa: N801 (HF's class name)
    """HF's ``Qwen2_5_VLVisionBlock``: RMSNorm blocks with a gated MLP; same forward as
    :class:`Qwen2VLVisionBlock` (``cu_seqlens`` the windows' or the frames')."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm1 = QwenRMSNorm(dim, eps=1e-6)
        self.norm2 = QwenRMSNorm(dim, eps=1e-6)
        self.attn = QwenVisionAttention(dim, config.num_heads)
        self.mlp = _GatedMlp(dim, config.intermediate_size, config.hidden_act)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: RopeTables) -> torch.Tensor:
        x = hidden_states + self.attn(self.norm1(hidden_states), cu_seqlens, position_embeddings)
        return x + self.mlp(self.norm2(x))


class _QwenVisionTower(nn.Module):
    """What the towers share: input checks, the HF constructor and the two entry points."""

    spatial_merge_size: int
    blocks: nn.ModuleList

    def _common(self, config: Any, dim: int) -> None:
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_size = config.patch_size
        self.rotary_pos_emb = _VisionRotaryTable(dim // config.num_heads, _rope_theta(config))

    @classmethod
    def from_hf(cls, hf_tower: nn.Module) -> _QwenVisionTower:
        """The tower of HF's matching class, on its device and in its dtype, with a copy of its
        weights (``load_state_dict(strict=True)``) and its train / eval mode."""
        # the rotary table is recomputed in fp32, not copied (an HF tower cast by .to(bf16)
        # holds it rounded to bf16)
        return copy_of(lambda: cls(hf_tower.config), hf_tower, buffers=False)

    def _check(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> None:
        """Shape checks on the host; the patch count and the merge-divisible grid on the CPU
        outside compile, else by device-side asserts (no host sync; on CUDA a failed one is a
        device-side assert, which ends the process's CUDA context)."""
        name = f"vlmkern.models.{type(self).__name__}"
        width = self.patch_embed.proj.weight[0].numel()
        if pixel_values.dim() != 2 or pixel_values.shape[1] != width:
            raise ValueError(f"{name}: pixel_values must be (N, C*T*P*P) = (N, {width}), got "
                             f"{tuple(pixel_values.shape)}")
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.dtype not in (
                torch.int32, torch.int64):
            raise ValueError(f"{name}: grid_thw must be (images, 3) int32 / int64, got "
                             f"{tuple(grid_thw.shape)} {grid_thw.dtype}")
        if grid_thw.device != pixel_values.device:
            raise ValueError(f"{name}: grid_thw is on {grid_thw.device}, pixel_values on "
                             f"{pixel_values.device}")
        n, m = pixel_values.shape[0], self.spatial_merge_size
        if n % (m * m):
            raise ValueError(f"{name}: {n} pixel rows are not a whole number of {m}x{m} merge "
                             "blocks")
        count = f"{name}: pixel_values' rows must equal grid_thw's patches (sum of t*h*w)"
        split = f"{name}: grid_thw's h and w must be divisible by spatial_merge_size={m}"
        total, divisible = grid_thw.prod(-1).sum() == n, (grid_thw[:, 1:] % m == 0).all()
        if grid_thw.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(total):
                raise ValueError(f"{count}: {n} rows, {int(grid_thw.prod(-1).sum())} patches")
            if not bool(divisible):
                raise ValueError(f"{split}, got {grid_thw.tolist()}")
        else:
            torch._assert_async(total, count)
            torch._assert_async(divisible, split)

    def _embed(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(pixel_values, grid_thw)

    def _encode(self, hidden: torch.Tensor, grid_thw: torch.Tensor) -> tuple:
        raise NotImplementedError

    def forward_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple:
        """``(merged (N / m², out_dim), last_hidden_state (N, D))`` in the weights' dtype: HF's
        ``pooler_output`` and ``last_hidden_state`` (for Qwen2.5-VL the latter in HF's window
        order: merge blocks permuted by the window index, as HF returns it). Qwen3-VL adds a
        third item, HF's ``deepstack_features``: a tuple of ``(N / m², out_dim)``."""
        self._check(pixel_values, grid_thw)
        return self._encode(self._embed(pixel_values, grid_thw), grid_thw)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` ``(N, C·T·P·P)`` float (the processor's patch rows, any float dtype:
        cast to the weights'), ``grid_thw`` ``(images, 3)`` int32 / int64 on the same device →
        the merged tokens ``(N / m², out_dim)`` in the weights' dtype, HF's ``pooler_output``."""
        return self.forward_features(pixel_values, grid_thw)[0]


class Qwen2VLVisionTransformer(_QwenVisionTower):
    """HF's ``Qwen2VisionTransformerPretrainedModel`` (Qwen2-VL's ``model.visual``): Conv3d patch
    embed, LayerNorm blocks with a quick-GELU MLP and attention per frame, LayerNorm 2×2 merger.
    ``Qwen2VLVisionTransformer(vision_config)`` or ``.from_hf(hf_tower)``; see ``forward``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.patch_embed = Qwen2VLPatchEmbed(config.patch_size, config.temporal_patch_size,
                                             config.in_channels, config.embed_dim)
        self._common(config, config.embed_dim)
        self.blocks = nn.ModuleList(Qwen2VLVisionBlock(config) for _ in range(config.depth))
        self.merger = Qwen2VLPatchMerger(config.hidden_size, config.embed_dim,
                                         config.spatial_merge_size)

    def _encode(self, hidden: torch.Tensor, grid_thw: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        rope = self.rotary_pos_emb(vision_position_ids(grid_thw, n, self.spatial_merge_size))
        cu_seqlens = vision_cu_seqlens(grid_thw, n)
        for block in self.blocks:
            hidden = block(hidden, cu_seqlens, rope)
        return self.merger(hidden), hidden


class Qwen2_5_VLVisionTransformer(_QwenVisionTower):  # noqa: N801 (HF's class name)
    """HF's ``Qwen2_5_VisionTransformerPretrainedModel`` (Qwen2.5-VL's ``model.visual``): RMSNorm
    blocks with a gated MLP, window attention except in ``fullatt_block_indexes`` (frame
    attention there), RMSNorm 2×2 merger, merged tokens put back in image order.
    ``Qwen2_5_VLVisionTransformer(vision_config)`` or ``.from_hf(hf_tower)``; see ``forward``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.patch_embed = Qwen2VLPatchEmbed(config.patch_size, config.temporal_patch_size,
                                             config.in_channels, config.hidden_size)
        self._common(config, config.hidden_size)
        self.window_size = config.window_size
        self.fullatt_block_indexes = tuple(config.fullatt_block_indexes)
        self.blocks = nn.ModuleList(Qwen2_5_VLVisionBlock(config) for _ in range(config.depth))
        self.merger = Qwen2_5_VLPatchMerger(config.out_hidden_size, config.hidden_size,
                                            config.spatial_merge_size)

    def _encode(self, hidden: torch.Tensor, grid_thw: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        n, m = hidden.shape[0], self.spatial_merge_size
        window_index, cu_windows = vision_window_index(grid_thw, n, m, self.window_size,
                                                       self.patch_size)  # (N/m²,), (N/m² + 1,)
        cu_frames = vision_cu_seqlens(grid_thw, n)

        def by_window(t: torch.Tensor) -> torch.Tensor:  # merge blocks in window order
            return t.reshape(n // (m * m), m * m, -1)[window_index].reshape(n, -1)

        hidden = by_window(hidden)
        rope = self.rotary_pos_emb(by_window(vision_position_ids(grid_thw, n, m)))
        for i, block in enumerate(self.blocks):
            cu_seqlens = cu_frames if i in self.fullatt_block_indexes else cu_windows
            hidden = block(hidden, cu_seqlens, rope)
        # HF's merged[argsort(window_index)], by the inverse permutation (no sort)
        inverse = torch.empty_like(window_index)
        inverse[window_index] = torch.arange(window_index.shape[0], device=inverse.device)
        return self.merger(hidden)[inverse], hidden


class Qwen3VLVisionTransformer(_QwenVisionTower):
    """HF's ``Qwen3VLVisionModel`` (Qwen3-VL's ``model.visual``; Qwen3-VL-MoE's has the same
    keys): Conv3d patch embed with bias + a learned square position table resampled bilinearly
    to each frame (one vlmkern.ops.patch_embed), LayerNorm blocks with a tanh-GELU MLP and
    attention per frame, LayerNorm 2×2 merger, and the DeepStack mergers' features after the
    blocks in ``deepstack_visual_indexes`` (third item of ``forward_features``)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        dim, m = config.hidden_size, config.spatial_merge_size
        self.patch_embed = _Qwen3Proj(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, dim)
        self.num_grid_per_side = int(config.num_position_embeddings**0.5)
        self._common(config, dim)
        self.blocks = nn.ModuleList(Qwen3VLVisionBlock(config) for _ in range(config.depth))
        self.merger = Qwen3VLVisionPatchMerger(dim, config.out_hidden_size, m)
        self.deepstack_visual_indexes = tuple(config.deepstack_visual_indexes)
        self.deepstack_merger_list = nn.ModuleList(
            Qwen3VLVisionPatchMerger(dim, config.out_hidden_size, m, use_postshuffle_norm=True)
            for _ in self.deepstack_visual_indexes)

    def _embed(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        proj, table, m = self.patch_embed.proj, self.pos_embed, self.spatial_merge_size
        if fusable(proj, table, types=(nn.Conv3d, nn.Embedding)):
            return patch_embed(pixel_values, proj.weight, proj.bias, pos_embed=table.weight,
                               grid_thw=grid_thw, spatial_merge_size=m)[0]
        # hooked / wrapped: HF's modules one by one, the table's taps from vision_grid
        n, side = pixel_values.shape[0], self.num_grid_per_side
        taps, weights = vision_interp_taps(grid_thw, n, m, side)  # (N, 4), (N, 4)
        hidden = proj(pixel_values.to(proj.weight.dtype).view(n, -1, *proj.kernel_size))
        positions = (table(taps) * weights[:, :, None]).sum(1)
        return hidden.view(n, -1) + positions.to(hidden.dtype)

    def _encode(self, hidden: torch.Tensor, grid_thw: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        n = hidden.shape[0]
        rope = self.rotary_pos_emb(vision_position_ids(grid_thw, n, self.spatial_merge_size))
        cu_seqlens = vision_cu_seqlens(grid_thw, n)
        deepstack = []
        for i, block in enumerate(self.blocks):
            hidden = block(hidden, cu_seqlens, rope)
            if i in self.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(hidden))
        return self.merger(hidden), hidden, tuple(deepstack)
