"""FLOPs of a vision-language prefill, from a model config alone (no weights).

Two figures:
  * the paper-comparable one: FastV's per-layer formula over the visual tokens only,
        F(n) = 4 n d^2 + 2 n^2 d + 2 n d m     (d = LLM hidden size, m = its MLP size),
    reduction = 1 - F(kept) / F(all). It counts multiply-adds of a non-gated MLP and ignores the
    text tokens, the vision tower and the projector: it is the number papers quote (LLaVA-1.5-7B,
    32 of 576 tokens: 94.6%), not the cost of a prefill.
  * the whole prefill: vision tower (every tile), projector, the CLIP text tower when the paper's
    relevance cue uses it, the cues themselves, and the LLM over all prompt tokens (text + kept
    visual), with the LM head on the last position only (what generate() computes).
    Convention: FLOPs = 2 x multiply-adds of every matmul (projections, attention scores,
    attention-weighted values, MLPs); norms, activations, softmax, RoPE and residual adds are
    left out (well under 1%). Attention is counted over the full square, as FastV does.

The table of the real models at the paper's budgets: `python -m tools.flops` (tools/flops.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.vision_utils import get_vision_window_index

QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 3136, 12845056  # Qwen2.5-VL-7B-Instruct preprocessor_config.json
QWEN3_VL_MIN_PIXELS, QWEN3_VL_MAX_PIXELS = 65536, 16777216  # Qwen3-VL-8B-Instruct preprocessor_config.json


# ----------------------------------------------------------------------------- paper figure


def fastv_flops(visual_tokens: int, hidden: int, intermediate: int, layers: int = 1) -> int:
    """FastV's per-layer count over the visual tokens: 4 n d^2 + 2 n^2 d + 2 n d m, times layers."""
    n, d, m = visual_tokens, hidden, intermediate
    return layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def fastv_reduction(all_tokens: int, kept_tokens: int, hidden: int, intermediate: int) -> float:
    """1 - F(kept) / F(all): the FLOPs reduction papers quote (the layer count cancels)."""
    return 1.0 - fastv_flops(kept_tokens, hidden, intermediate) / fastv_flops(all_tokens, hidden, intermediate)


# ----------------------------------------------------------------------------- building blocks


def matmul(tokens: int, d_in: int, d_out: int) -> int:
    """(tokens, d_in) @ (d_in, d_out)."""
    return 2 * tokens * d_in * d_out


def attention_core(segments: list[int], width: int) -> int:
    """Q K^T and probs @ V, each segment attending within itself; width = heads * head_dim."""
    return sum(2 * matmul(s, width, s) for s in segments)


def transformer_layer(
    tokens: int, segments: list[int], hidden: int, q_width: int, kv_width: int, intermediate: int, gated: bool
) -> int:
    """One pre-norm block: q, k, v, o projections, attention, MLP (gated: 3 matrices, else 2)."""
    projections = matmul(tokens, hidden, q_width) + 2 * matmul(tokens, hidden, kv_width) + matmul(tokens, q_width, hidden)
    mlp = (3 if gated else 2) * matmul(tokens, hidden, intermediate)
    return projections + attention_core(segments, q_width) + mlp


def mlp_width(text_config) -> int:
    """The gated MLP width each token goes through: the dense MLP's, or (MoE: Qwen3-VL-30B-A3B) the
    active experts' together (`num_experts_per_tok` x `moe_intermediate_size`), plus the shared
    expert's where there is one (Qwen3.5 MoE)."""
    c = text_config
    if getattr(c, "num_experts", 0):
        return c.num_experts_per_tok * c.moe_intermediate_size + getattr(c, "shared_expert_intermediate_size", 0)
    return c.intermediate_size


def gated_deltanet(tokens: int, text_config) -> int:
    """Qwen3.5's linear-attention token mixer (Gated DeltaNet) over `tokens` tokens, linear in tokens.
    Counted: the projections of the stock module (in_proj_qkv to 2 key widths + the value width,
    in_proj_z to the value width, in_proj_b and in_proj_a to one scalar per value head, out_proj back),
    the depthwise causal convolution (kernel taps per channel), and the delta rule per token and value
    head on its (key dim x value dim) state in the recurrent form: read k^T S, write k (x) delta, read
    q^T S (3 products of the state's size; the stock prefill's chunked form adds an intra-chunk term
    of 64-token chunks, not counted). Left out: the decay and gate element-wise products, the L2
    norms and the gated RMSNorm."""
    c = text_config
    key_width, value_width = c.linear_num_key_heads * c.linear_key_head_dim, c.linear_num_value_heads * c.linear_value_head_dim
    conv_width = 2 * key_width + value_width
    projections = (
        matmul(tokens, c.hidden_size, conv_width) + matmul(tokens, c.hidden_size, value_width)
        + 2 * matmul(tokens, c.hidden_size, c.linear_num_value_heads) + matmul(tokens, value_width, c.hidden_size)
    )
    convolution = 2 * tokens * conv_width * c.linear_conv_kernel_dim
    delta_rule = 3 * 2 * tokens * c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim
    return projections + convolution + delta_rule


def language_model(text_config, length: int) -> int:
    """Llama / Qwen2 / Qwen3 decoder over `length` prompt tokens + the LM head on the last position
    (MoE: the active experts and the router). Qwen3.5 (`layer_types` with "linear_attention"): those
    layers' attention is a Gated DeltaNet (`gated_deltanet`), and its full-attention layers' q_proj
    also writes the output gate (twice the query width)."""
    c = text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    layer_types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    hybrid = "linear_attention" in layer_types
    attention = matmul(length, c.hidden_size, c.num_attention_heads * head_dim) if hybrid else 0  # the output gate
    attention += transformer_layer(
        length, [length], c.hidden_size, c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim,
        mlp_width(c), gated=True,
    )
    mlp = 3 * matmul(length, c.hidden_size, mlp_width(c))
    linear = gated_deltanet(length, c) + mlp if hybrid else 0
    router = matmul(length, c.hidden_size, c.num_experts) if getattr(c, "num_experts", 0) else 0
    if getattr(c, "shared_expert_intermediate_size", 0):
        router += matmul(length, c.hidden_size, 1)  # the shared expert's gate
    layers = sum(linear if kind == "linear_attention" else attention for kind in layer_types)
    return layers + len(layer_types) * router + matmul(1, c.hidden_size, c.vocab_size)


def clip_vision_tower(vision_config, tiles: int) -> int:
    """CLIP ViT on `tiles` images: patch embedding + every encoder layer (transformers runs them
    all, even when LLaVA reads the penultimate one)."""
    c = vision_config
    patches = (c.image_size // c.patch_size) ** 2
    tokens = patches + 1  # + [CLS]
    embed = matmul(tiles * patches, 3 * c.patch_size**2, c.hidden_size)
    layer = transformer_layer(
        tiles * tokens, [tokens] * tiles, c.hidden_size, c.hidden_size, c.hidden_size, c.intermediate_size, gated=False
    )
    return embed + c.num_hidden_layers * layer


def clip_text_tower(text_config, segments: int, image_tokens: int, vision_hidden: int) -> int:
    """The paper's relevance cue: CLIP text tower over `segments` full windows + its projection,
    and CLIP's visual projection of the `image_tokens` patch features."""
    c = text_config
    window = c.max_position_embeddings
    layer = transformer_layer(
        segments * window, [window] * segments, c.hidden_size, c.hidden_size, c.hidden_size, c.intermediate_size,
        gated=False,
    )
    return (
        c.num_hidden_layers * layer
        + matmul(segments, c.hidden_size, c.projection_dim)
        + matmul(image_tokens, vision_hidden, c.projection_dim)
    )


# ----------------------------------------------------------------------------- token geometry


@dataclass(frozen=True)
class Geometry:
    """Token counts of one image's prefill.

    visual_tokens: image tokens the LLM sees unpruned (N, what the budget applies to).
    projected_tokens: tokens that go through the projector (N minus LLaVA-NeXT's newline tokens).
    tiles: vision-tower images (1; LLaVA-NeXT: base + crops).
    vision_patches: patch tokens through the vision tower in all (Qwen: before the 2x2 merge).
    vision_windows: Qwen window-attention segment lengths (empty for CLIP).
    """

    visual_tokens: int
    projected_tokens: int
    tiles: int = 1
    vision_patches: int = 0
    vision_windows: tuple[int, ...] = ()


def llava_geometry(config) -> Geometry:
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    return Geometry(visual_tokens=patches, projected_tokens=patches, tiles=1, vision_patches=patches)


def llava_next_geometry(config, image_hw: tuple[int, int]) -> Geometry:
    """Anyres: the base image + the crops of the best grid pinpoint; the packed sequence is the
    base tile, then the unpadded crop grid with one newline token closing each row (as
    LlavaNextProcessor counts them)."""
    height, width = image_hw
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    best_h, best_w = select_best_resolution([height, width], config.image_grid_pinpoints)
    unpadded, newlines = LlavaNextProcessor._get_unpadded_features(
        None, height, width, side, side, best_h // tile, best_w // tile
    )
    tiles = 1 + (best_h // tile) * (best_w // tile)
    return Geometry(
        visual_tokens=side * side + unpadded + newlines,
        projected_tokens=tiles * side * side,
        tiles=tiles,
        vision_patches=tiles * side * side,
    )


def qwen_patch_grid(vision_config, image_hw: tuple[int, int], min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(rows, cols) of patches of an image resized by the processor's `smart_resize` (multiples of
    patch x merge px within the pixel limits)."""
    v = vision_config
    factor = v.patch_size * v.spatial_merge_size
    height, width = smart_resize(*image_hw, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return height // v.patch_size, width // v.patch_size


def qwen2_5_vl_geometry(config, image_hw: tuple[int, int]) -> Geometry:
    """Qwen2.5-VL: the image is resized to multiples of 28 px (published pixel limits), cut into
    14 px patches (one temporal step), windows of 112 px in most blocks, merged 2x2 into tokens."""
    v = config.vision_config
    grid_h, grid_w = qwen_patch_grid(v, image_hw, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
    _, cu_windows = get_vision_window_index(
        torch.tensor([[1, grid_h, grid_w]]), v.spatial_merge_size, v.window_size, v.patch_size
    )
    tokens = grid_h * grid_w // v.spatial_merge_size**2
    return Geometry(
        visual_tokens=tokens,
        projected_tokens=tokens,
        tiles=1,
        vision_patches=grid_h * grid_w,
        vision_windows=tuple(int(s) for s in cu_windows.diff() if s > 0),
    )


def qwen3_vl_geometry(config, image_hw: tuple[int, int]) -> Geometry:
    """Qwen3-VL (dense and MoE) and Qwen3.5 (the same tower without DeepStack): the image is resized to multiples of 32 px (published pixel limits),
    cut into 16 px patches, every block attends over the whole image, merged 2x2 into tokens."""
    grid_h, grid_w = qwen_patch_grid(config.vision_config, image_hw, QWEN3_VL_MIN_PIXELS, QWEN3_VL_MAX_PIXELS)
    tokens = grid_h * grid_w // config.vision_config.spatial_merge_size**2
    return Geometry(visual_tokens=tokens, projected_tokens=tokens, tiles=1, vision_patches=grid_h * grid_w)


def geometry(config, image_hw: tuple[int, int] | None = None) -> Geometry:
    """Token geometry of one image for a config, by its family (mfpruner_lib.families; LLaVA-1.5
    ignores image_hw: always one tile)."""
    from mfpruner_lib.families import FAMILIES, by_model_type  # the registry names this module's functions

    family = by_model_type(config.model_type)
    if family is None:
        names = ", ".join(family.name for family in FAMILIES.values())
        raise ValueError(f"`config.model_type` must be a {names} type, got {config.model_type!r}")
    return family.geometry(config, image_hw)


# ----------------------------------------------------------------------------- whole prefill


@dataclass(frozen=True)
class PrefillFlops:
    """FLOPs of one prefill, by part."""

    vision: int
    projector: int
    text_tower: int
    cues: int
    llm: int
    lm_length: int

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.text_tower + self.cues + self.llm


def qwen_vision_tower(vision_config, geo: Geometry) -> int:
    """Qwen2.5-VL: window blocks attend within 112 px windows, full blocks over the whole image, gated
    MLP. Qwen3-VL (no `fullatt_block_indexes`): every block over the whole image, two-matrix MLP."""
    v, patches = vision_config, geo.vision_patches
    windowed = hasattr(v, "fullatt_block_indexes")
    embed = matmul(patches, v.in_channels * v.temporal_patch_size * v.patch_size**2, v.hidden_size)
    blocks = 0
    for index in range(v.depth):
        segments = list(geo.vision_windows) if windowed and index not in v.fullatt_block_indexes else [patches]
        blocks += transformer_layer(
            patches, segments, v.hidden_size, v.hidden_size, v.hidden_size, v.intermediate_size, gated=windowed
        )
    return embed + blocks


def prefill_flops(
    config,
    text_tokens: int,
    kept: int | None = None,
    image_hw: tuple[int, int] | None = None,
    clip_text_config=None,
    clip_text_segments: int = 1,
) -> PrefillFlops:
    """One image + `text_tokens` prompt tokens. kept=None: the unpruned stock prefill (no cues);
    else `kept` visual tokens reach the LLM and the cues are counted: [CLS] attention row (CLIP)
    or attention received in the last full block (Qwen), uniqueness, relevance (the CLIP text
    tower when `clip_text_config` is given, else LLM-space)."""
    geo = geometry(config, image_hw)
    text = config.text_config
    if kind_is_qwen(config):
        v = config.vision_config
        vision = qwen_vision_tower(v, geo)
        merged_width = v.hidden_size * v.spatial_merge_size**2
        mergers = 1 + len(getattr(v, "deepstack_visual_indexes", ()))  # Qwen3-VL: + one merger per DeepStack level
        projector = mergers * (
            matmul(geo.projected_tokens, merged_width, merged_width) + matmul(geo.projected_tokens, merged_width, v.out_hidden_size)
        )
        attention_cue = matmul(geo.vision_patches, v.hidden_size, geo.vision_patches)  # Q K^T, column sums
        vision_hidden = v.hidden_size
    else:
        v = config.vision_config
        vision = clip_vision_tower(v, geo.tiles)
        projector = matmul(geo.projected_tokens, v.hidden_size, text.hidden_size) + matmul(
            geo.projected_tokens, text.hidden_size, text.hidden_size
        )
        tile_tokens = geo.vision_patches + geo.tiles  # + one [CLS] per tile
        attention_cue = matmul(tile_tokens, v.hidden_size, 1)  # the [CLS] query row only
        vision_hidden = v.hidden_size
    if kept is None:
        return PrefillFlops(vision, projector, 0, 0, language_model(text, text_tokens + geo.visual_tokens),
                            text_tokens + geo.visual_tokens)
    n = geo.visual_tokens
    uniqueness_cue = matmul(n, text.hidden_size, 1)  # x_i . s
    if clip_text_config is not None:
        text_tower = clip_text_tower(clip_text_config, clip_text_segments, geo.projected_tokens, vision_hidden)
        relevance_cue = matmul(n, clip_text_config.projection_dim, clip_text_segments)
    else:
        text_tower = 0
        relevance_cue = matmul(n, text.hidden_size, 1)
    cues = attention_cue + uniqueness_cue + relevance_cue
    return PrefillFlops(vision, projector, text_tower, cues, language_model(text, text_tokens + kept), text_tokens + kept)


def kind_is_qwen(config) -> bool:
    return config.model_type.endswith(("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"))
