"""Drop-in bench: pieces of HF transformers VLMs (random weights; real widths on the GPU, tiny
ones on the CPU) as HF runs them, after ``vlmkern.integrations.hf.patch_model`` ("vlmkern") and,
where it has them, as ``vlmkern.models``' own towers ("vlmkern.models": the Qwen ViTs, LLaVA's
CLIP + projector, InternVL's InternViT + projector with the shuffle fused, SmolVLM's tower +
connector):

- Qwen2-VL's ViT (widths of Qwen2-VL-7B, 8 of its 32 blocks) on 8 images of 448² and on one
  1344² image; Qwen2.5-VL-7B's ViT (8 blocks, window attention in 6) on one 896² image;
- LLaVA-1.5's image features: CLIP-L/14-336 (all 24 layers) + the projector, 4 images;
- InternVL2.5-8B's image features: InternViT-300M (24 layers, 448² tiles), pixel shuffle,
  LayerNorm + MLP projector, 4 tiles (the patched side runs HF's shuffle function: the drop-in
  replaces it on InternVLModel instances, which this bench does not build);
- Llama-3.2-11B-Vision's image states: the tiled tower (8 of its 32 local layers, the 8 global
  ones; 2 images of 2 real tiles out of 4, 560²) + projector; HF attends under a dense
  aspect-ratio mask, vlmkern.models with key ranges (the drop-in has nothing for this tower, so
  only vlmkern.models runs against HF);
- SmolVLM2-2.2B's image features: its SigLIP-so400m-shaped tower (27 layers, 384² tiles) and
  the 3x3 pixel-shuffle connector, 8 full tiles (no patch mask; the drop-in replaces only the
  connector);
- Mllama-11B's gated cross-attention decoder layer, 1024 text tokens x one 4-tile image, and a
  decode step of 16 rows reading the image's cached keys;
- BLIP-2's Q-Former (32 learned queries, 12 layers, cross-attention to ViT-g's 257 tokens) on
  64 images.

Both sides are timed eagerly (HF's Qwen ViT syncs the host, so no CUDA graph for either): what a
user of the model sees. One more Qwen2.5-VL case ("graph") captures each side in a CUDA graph
where it can: the patched tower has no host sync (vlmkern.ops.vision_grid's indices), HF's
fails to capture and is timed eagerly (the row's note says so). "bytes" is the weights' size
(read once per call at least); the correctness gate is HF's own output in the bench dtype."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vlmkern.bench.harness import Case, Config

NAME = "hf_models"
BASELINE = "HF"
EXACT = False


@dataclass
class Spec:
    hf: nn.Module
    vk: nn.Module | None  # patched by the drop-in; None where it replaces nothing
    call: Callable  # (model, *inputs) -> tensor
    models: nn.Module | None = None  # vlmkern.models' equivalent, where there is one
    models_call: Callable | None = None  # (models, *inputs) -> tensor


def hf_model(*inputs, spec: Spec) -> torch.Tensor:
    with torch.no_grad():
        return spec.call(spec.hf, *inputs)


def vlmkern_model(*inputs, spec: Spec) -> torch.Tensor:
    if spec.vk is None:
        raise NotImplementedError("the drop-in replaces nothing here")
    with torch.no_grad():
        return spec.call(spec.vk, *inputs)


class _Holder(nn.Module):
    """A root for patch_model: the modules under test plus the config builders read."""

    def __init__(self, config, **modules: nn.Module) -> None:
        super().__init__()
        self.config = config
        for name, m in modules.items():
            self.add_module(name, m)


def models_model(*inputs, spec: Spec) -> torch.Tensor:
    if spec.models is None:
        raise NotImplementedError("no vlmkern.models equivalent")
    with torch.no_grad():
        return spec.models_call(spec.models, *inputs)


def _case(label: str, root: nn.Module, call: Callable, make: Callable, cfg: Config,
          graph: bool = False, models: Callable | None = None, patch: bool = True) -> Case:
    """``models(root on the bench's device and dtype) -> (vlmkern.models module, its call)``;
    ``patch=False``: a case the drop-in has nothing for (only vlmkern.models runs)."""
    from vlmkern.integrations.hf import patch_model, unpatch_functions

    root = root.to(cfg.device, cfg.dtype).eval()
    patched = copy.deepcopy(root) if patch else None
    if patch:
        report = patch_model(patched, rope=False)  # the ViT attention calls vlmkern's rope
        unpatch_functions()
        if report.skipped or not report.replaced:
            raise RuntimeError(f"hf_models bench {label}: nothing or not everything patched\n"
                               f"{report}")
    weights = sum(p.numel() * p.element_size() for p in root.parameters())
    spec = Spec(root, patched, call, *(models(root) if models else ()))
    return Case(label, make, weights, {"spec": spec}, cuda_graph=graph)


def _randn(*shape: int, cfg: Config) -> torch.Tensor:
    return torch.randn(*shape, device=cfg.device).to(cfg.dtype)


# ---- Qwen2-VL / Qwen2.5-VL ViT -----------------------------------------------------------------


def _qwen_vit(label: str, family: str, images: int, side: int, cfg: Config,
              graph: bool = False) -> Case:
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as q25
    import transformers.models.qwen2_vl.modeling_qwen2_vl as q2

    gpu = cfg.device != "cpu"  # real widths on the GPU (and on "meta", to check them)
    dims = dict(depth=8, num_heads=16) if gpu else dict(depth=2, num_heads=4)
    width = 1280 if gpu else 256
    if family == "qwen2_vl":
        config = q2.Qwen2VLVisionConfig(**dims, embed_dim=width, hidden_size=3584 if gpu else 512)
        with torch.device(cfg.device):
            model = q2.Qwen2VisionTransformerPretrainedModel(config)
    else:
        config = q25.Qwen2_5_VLVisionConfig(
            **dims, hidden_size=width, intermediate_size=3420 if gpu else 512,
            out_hidden_size=3584 if gpu else 512, window_size=112,
            fullatt_block_indexes=[3, 7] if gpu else [1])
        with torch.device(cfg.device):
            model = q25.Qwen2_5_VisionTransformerPretrainedModel(config)
    grid_side = side // 14
    tokens = images * grid_side**2

    def make() -> tuple:
        rows = _randn(tokens, 3 * 2 * 14 * 14, cfg=cfg)
        grid = torch.tensor([[1, grid_side, grid_side]] * images, device=cfg.device)
        return rows, grid

    def call(m, rows, grid):
        return m(rows, grid_thw=grid).pooler_output

    def models(hf: nn.Module) -> tuple[nn.Module, Callable]:
        from vlmkern.models import Qwen2_5_VLVisionTransformer, Qwen2VLVisionTransformer

        tower = Qwen2VLVisionTransformer if family == "qwen2_vl" else Qwen2_5_VLVisionTransformer
        return tower.from_hf(hf), lambda m, rows, grid: m(rows, grid)

    return _case(label, model, call, make, cfg, graph, models)


# ---- LLaVA-1.5 image features ------------------------------------------------------------------


def _llava(label: str, images: int, cfg: Config) -> Case:
    import transformers as T
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    gpu = cfg.device != "cpu"  # real widths on the GPU (and on "meta", to check them)
    vision = T.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, image_size=336, patch_size=14) if gpu \
        else T.CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=2, image_size=112, patch_size=14)
    text = T.LlamaConfig(hidden_size=4096 if gpu else 256, num_attention_heads=32 if gpu else 4)
    config = T.LlavaConfig(vision_config=vision, text_config=text)
    with torch.device(cfg.device):
        root = _Holder(config, vision_tower=T.CLIPVisionModel(vision),
                       projector=LlavaMultiModalProjector(config))

    def make() -> tuple:
        return (_randn(images, 3, vision.image_size, vision.image_size, cfg=cfg),)

    def call(m, pixels):  # HF LlavaModel.get_image_features: layer -2, CLS dropped
        states = m.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        return m.projector(states[:, 1:])

    def models(hf: nn.Module) -> tuple[nn.Module, Callable]:
        from vlmkern.models import CLIPVisionTransformer
        from vlmkern.nn import LlavaMultiModalProjector

        projector = LlavaMultiModalProjector.from_config(config).to(cfg.device, cfg.dtype)
        projector.load_state_dict(hf.projector.state_dict())
        root = _Holder(config, vision_tower=CLIPVisionTransformer.from_hf(hf.vision_tower),
                       projector=projector)
        return root, lambda m, pixels: m.projector(m.vision_tower(pixels, feature_layer=-2)[:, 1:])

    return _case(label, root, call, make, cfg, models=models)


# ---- InternVL2.5-8B image features -------------------------------------------------------------


def _internvl(label: str, images: int, cfg: Config) -> Case:
    import transformers as T
    from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

    gpu = cfg.device != "cpu"  # real widths on the GPU (and on "meta", to check them)
    vision = T.InternVLVisionConfig(hidden_size=1024, intermediate_size=4096,
                                    num_hidden_layers=24, num_attention_heads=16,
                                    image_size=448, patch_size=14, attention_bias=True) if gpu \
        else T.InternVLVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=112, patch_size=14,
                                    attention_bias=True)
    text = T.Qwen2Config(hidden_size=4096 if gpu else 256, num_attention_heads=32 if gpu else 4)
    config = T.InternVLConfig(vision_config=vision, text_config=text)
    with torch.device(cfg.device):
        root = _Holder(config, vision_tower=T.InternVLVisionModel(vision),
                       multi_modal_projector=InternVLMultiModalProjector(config))
    side = vision.image_size[0] // vision.patch_size[0]

    def make() -> tuple:
        return (_randn(images, 3, *vision.image_size, cfg=cfg),)

    def call(m, pixels):  # HF InternVLModel.get_image_features: last state, CLS dropped
        states = m.vision_tower(pixels).last_hidden_state[:, 1:].reshape(images, side, side, -1)
        shuffled = T.InternVLModel.pixel_shuffle(m, states)  # HF's function (self unused)
        return m.multi_modal_projector(shuffled.reshape(images, -1, shuffled.shape[-1]))

    def models(hf: nn.Module) -> tuple[nn.Module, Callable]:
        from vlmkern.models import InternVLVisionTransformer
        from vlmkern.nn import InternVLMultiModalProjector as Ours

        projector = Ours.from_config(config).to(cfg.device, cfg.dtype)
        projector.load_state_dict(hf.multi_modal_projector.state_dict())
        root = _Holder(config, multi_modal_projector=projector,
                       vision_tower=InternVLVisionTransformer.from_hf(hf.vision_tower))

        def run(m, pixels):  # the pixel shuffle fused with the projector's LayerNorm
            features = m.vision_tower(pixels)[:, 1:]
            return m.multi_modal_projector(features, grid=(side, side))  # (B, N / 4, D)

        return root, run

    return _case(label, root, call, make, cfg, models=models)


# ---- SmolVLM2-2.2B image features --------------------------------------------------------------


def _smolvlm(label: str, tiles: int, cfg: Config) -> Case:
    import transformers as T
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

    gpu = cfg.device != "cpu"  # real widths on the GPU (and on "meta", to check them)
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                  num_attention_heads=16, image_size=384, patch_size=14) if gpu \
        else dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, image_size=112, patch_size=14)
    text = dict(hidden_size=2048 if gpu else 256, num_attention_heads=32 if gpu else 4,
                num_hidden_layers=1, vocab_size=1000, model_type="llama")
    config = T.SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=3 if gpu else 2)
    with torch.device(cfg.device):
        root = _Holder(config, vision_model=T.SmolVLMVisionTransformer(config.vision_config),
                       connector=SmolVLMConnector(config))
    side = vision["image_size"]

    def make() -> tuple:
        return (_randn(tiles, 3, side, side, cfg=cfg),)

    def call(m, pixels):  # HF SmolVLMModel.get_image_features for full (unpadded) tiles
        return m.connector(m.vision_model(pixels).last_hidden_state)

    def models(hf: nn.Module) -> tuple[nn.Module, Callable]:
        from vlmkern.models import Idefics3VisionTransformer
        from vlmkern.nn import SmolVLMConnector as Ours

        connector = Ours.from_config(config).to(cfg.device, cfg.dtype)
        connector.load_state_dict(hf.connector.state_dict())
        root = _Holder(config, connector=connector,
                       vision_model=Idefics3VisionTransformer.from_hf(hf.vision_model))
        return root, lambda m, pixels: m.connector(m.vision_model(pixels))

    return _case(label, root, call, make, cfg, models=models)


# ---- Llama-3.2-11B-Vision image states ----------------------------------------------------------


def _mllama_vision(label: str, images: int, cfg: Config) -> Case:
    """MllamaModel's image states: the tiled tower (4 tiles of 560² a image, 1601 tokens a tile
    padded to 1608; HF attends under a dense (B, 1, L, L) aspect-ratio mask) + the projector.
    The GPU case runs 8 of the 32 local layers and the 8 global ones; two of four tiles real."""
    import transformers as T
    from transformers.models.mllama import modeling_mllama as mm

    gpu = cfg.device != "cpu"  # real widths on the GPU (and on "meta", to check them)
    vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=8,
                  num_global_layers=8, attention_heads=16, image_size=560, patch_size=14,
                  intermediate_layers_indices=[3, 7], vision_output_dim=3840) if gpu \
        else dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_global_layers=1,
                  attention_heads=2, image_size=56, patch_size=14, intermediate_layers_indices=[0],
                  vision_output_dim=256)
    text = dict(hidden_size=4096 if gpu else 256, num_attention_heads=32 if gpu else 4,
                num_key_value_heads=8 if gpu else 2, num_hidden_layers=1, vocab_size=1000)
    config = T.MllamaConfig(vision_config=vision, text_config=text)
    config.vision_config._attn_implementation = "sdpa"  # what from_pretrained picks
    with torch.device(cfg.device):
        tower = mm.MllamaVisionModel(config.vision_config)
        root = _Holder(config, vision_model=tower,
                       multi_modal_projector=nn.Linear(config.vision_config.vision_output_dim,
                                                       config.text_config.hidden_size))
    with torch.no_grad():  # HF initializes the gates to 0, which would hide the gated terms
        for name, p in tower.named_parameters():
            if "gate" in name.rsplit(".", 1)[-1]:
                p.fill_(0.7)
    tiles, side = config.vision_config.max_num_tiles, vision["image_size"]
    ids = torch.full((images, 1), 2, device=cfg.device)  # aspect ratio 1 x 2: two tiles
    tile_mask = torch.tensor([[[1, 1] + [0] * (tiles - 2)]] * images, device=cfg.device)

    def make() -> tuple:
        return (_randn(images, 1, tiles, 3, side, side, cfg=cfg),)

    def call(m, pixels):  # HF MllamaModel.get_image_features + the projector's reshape
        states = m.vision_model(pixels, aspect_ratio_ids=ids,
                                aspect_ratio_mask=tile_mask).last_hidden_state
        return m.multi_modal_projector(states).flatten(1, 3)

    def models(hf: nn.Module) -> tuple[nn.Module, Callable]:
        from vlmkern.models import Mllama, MllamaVisionTransformer

        projector = nn.Linear(config.vision_config.vision_output_dim,
                              config.text_config.hidden_size).to(cfg.device, cfg.dtype)
        projector.load_state_dict(hf.multi_modal_projector.state_dict())
        root = _Holder(config, multi_modal_projector=projector,
                       vision_model=MllamaVisionTransformer.from_hf(hf.vision_model))
        return root, lambda m, pixels: Mllama.image_states(m, pixels, ids, tile_mask)

    return _case(label, root, call, make, cfg, models=models, patch=False)


# ---- BLIP-2 Q-Former ----------------------------------------------------------------------------


def _qformer(label: str, images: int, cfg: Config) -> Case:
    """BLIP-2's Q-Former (12 layers of 768, cross-attention every other layer to ViT-g's 257
    tokens of 1408) on the learned queries of ``images`` images, in the bench dtype."""
    import transformers as T

    gpu = cfg.device != "cpu"
    qformer = T.Blip2QFormerConfig(
        hidden_size=768 if gpu else 128, num_attention_heads=12 if gpu else 2,
        intermediate_size=3072 if gpu else 256, num_hidden_layers=12 if gpu else 2,
        encoder_hidden_size=1408 if gpu else 96, cross_attention_frequency=2)
    qformer._attn_implementation = "sdpa"
    with torch.device(cfg.device):
        model = T.Blip2QFormerModel(qformer)
    tokens = 257 if gpu else 65

    def make() -> tuple:
        return (_randn(images, 32, qformer.hidden_size, cfg=cfg),
                _randn(images, tokens, qformer.encoder_hidden_size, cfg=cfg))

    def call(m, queries, image):
        return m(query_embeds=queries, encoder_hidden_states=image).last_hidden_state

    return _case(label, model, call, make, cfg)


# ---- Mllama cross-attention decoder layer ------------------------------------------------------


class _Cache:
    """HF's cache as the cross-attention layer reads it at a decode step: layers[i].keys /
    .values, the image's (B, Hk, L, D) keys and values."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.layers = [type("Layer", (), {"keys": keys, "values": values})()]


def _mllama(label: str, seq: int, tiles: int, cfg: Config, decode_batch: int = 0) -> Case:
    """Prefill: ``seq`` text tokens and the image states (keys projected in the layer). With
    ``decode_batch``: one token per row, the image keys from the cache."""
    import transformers as T
    from transformers.models.mllama import modeling_mllama as mm

    gpu = cfg.device != "cpu"  # real widths on the GPU (and on "meta", to check them)
    text = T.MllamaTextConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                              intermediate_size=14336) if gpu else \
        T.MllamaTextConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=512)
    vision = dict(image_size=560, patch_size=14) if gpu else dict(image_size=56, patch_size=14)
    config = T.MllamaConfig(vision_config=vision, text_config=text)
    text._attn_implementation = "sdpa"  # what from_pretrained picks; a bare layer has none
    with torch.device(cfg.device):
        layer = mm.MllamaCrossAttentionDecoderLayer(text, layer_idx=0)
    with torch.no_grad():
        layer.cross_attn_attn_gate.fill_(0.5)
        layer.cross_attn_mlp_gate.fill_(0.5)
    n = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    batch = decode_batch or 1
    tile_mask = torch.ones(batch, seq, 1, tiles, dtype=torch.long)
    tile_mask[:, : seq // 8] = 0  # the text before the image sees nothing
    mask, rows = mm._prepare_cross_attention_mask(tile_mask, n, cfg.dtype)
    mask, rows = mask.to(cfg.device), rows.to(cfg.device)
    hk, d = text.num_key_value_heads, text.hidden_size // text.num_attention_heads

    def make() -> tuple:  # image states as MllamaModel passes them: (B · images · tiles, n, H)
        x = _randn(batch, seq, text.hidden_size, cfg=cfg)
        if decode_batch:
            return x, _Cache(_randn(batch, hk, tiles * n, d, cfg=cfg),
                             _randn(batch, hk, tiles * n, d, cfg=cfg))
        return x, _randn(tiles, n, text.hidden_size, cfg=cfg)

    def call(m, x, states):
        if decode_batch:
            return m.layer(x, None, mask, None, rows, past_key_values=states)
        return m.layer(x, states, mask, None, rows)

    return _case(label, _Holder(config, layer=layer), call, make, cfg)


def cases(cfg: Config) -> list[Case]:
    if cfg.device == "cuda":
        out = [_qwen_vit("qwen2-vl-7b vit x8 8x448²", "qwen2_vl", 8, 448, cfg),
               _mllama("mllama-11b xattn layer S1024 4 tiles", 1024, 4, cfg),
               _mllama("mllama-11b xattn decode B16 4 tiles", 1, 4, cfg, decode_batch=16)]
        if not cfg.quick:
            out += [_qwen_vit("qwen2-vl-7b vit x8 1x1344²", "qwen2_vl", 1, 1344, cfg),
                    _qwen_vit("qwen2.5-vl-7b vit x8 1x896²", "qwen2_5_vl", 1, 896, cfg),
                    _qwen_vit("qwen2.5-vl-7b vit x8 1x896² graph", "qwen2_5_vl", 1, 896, cfg,
                              graph=True),
                    _llava("llava-1.5 clip-l336+proj B4", 4, cfg),
                    _internvl("internvl2.5-8b vit-300m+shuffle+proj B4", 4, cfg),
                    _smolvlm("smolvlm2-2.2b siglip+shuffle+proj 8 tiles", 8, cfg),
                    _mllama_vision("mllama-11b vision x8+8 B2 2/4 tiles", 2, cfg),
                    _qformer("blip-2 q-former 32 queries B64", 64, cfg)]
        return out
    out = [_qwen_vit("tiny qwen2-vl vit 4x112²", "qwen2_vl", 4, 112, cfg),
           _mllama("tiny mllama xattn layer S128", 128, 4, cfg),
           _mllama("tiny mllama xattn decode B4", 1, 4, cfg, decode_batch=4)]
    if not cfg.quick:
        out += [_qwen_vit("tiny qwen2.5-vl vit 1x224²", "qwen2_5_vl", 1, 224, cfg),
                _llava("tiny llava clip+proj B4", 4, cfg),
                _internvl("tiny internvl vit+shuffle+proj B4", 4, cfg),
                _smolvlm("tiny smolvlm vit+shuffle+proj 4 tiles", 4, cfg),
                _mllama_vision("tiny mllama vision B2", 2, cfg),
                _qformer("tiny blip-2 q-former B8", 8, cfg)]
    return out


def providers(cfg: Config) -> dict[str, Callable]:
    return {"vlmkern": vlmkern_model, "vlmkern.models": models_model, "HF": hf_model}


def reference() -> Callable:
    return hf_model
