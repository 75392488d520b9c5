"""MFPruner for LLaVA-1.5 (llava-hf/llava-1.5-7b-hf, -13b-hf) and LLaVA-1.6 / LLaVA-NeXT
(llava-hf/llava-v1.6-vicuna-7b-hf and the other LlavaNextForConditionalGeneration checkpoints).

The path, top to bottom:
  pixels -> CLIP vision tower; hooks installed once on the select layer ([CLS] query, keys,
            features) write into the call's capture buffer (mfpruner_pipeline.CUE_CAPTURE)
         -> projector (LLaVA-NeXT: + packing of the tiles) -> visual tokens scattered into the
            prompt embeddings
         -> cues, vote, splice, language model: mfpruner_pipeline.MFPrunerPipelineMixin.

This file holds only the visual encoding of the two LLaVA families (`encode_images`) and the
optional CLIP text tower of the paper's relevance cue. See mfpruner_pipeline for the contract of
generate() / forward() and where the per-call `MFPrunerResult` lives.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    GenerationMixin,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

if __package__:  # remote code (transformers_modules.<repo>.<file>): the repo's own sibling files
    from .configuration_mfpruner import MFPrunerLlavaConfig, MFPrunerLlavaNextConfig
    from .mfpruner_core import (
        LAYOUT_GRID,
        LAYOUT_NEWLINE,
        MFPrunerResult,
        attention_from_query,
        check_image_tokens,
        grid_layout,
        select_best_resolution,
    )
    from .mfpruner_pipeline import (
        EncodedPrompt,
        MFPrunerPipelineMixin,
        VisualItem,
        cue_capture,
        current_cue_capture,
        register_stock_key_layout,
    )
else:  # a top-level module of a checkout (tests, tools, app.py). By module name: transformers' remote-code
    # check would demand that an absolute `from x import y` here name an installed package.
    from importlib import import_module

    _configuration = import_module("configuration_mfpruner")
    MFPrunerLlavaConfig = _configuration.MFPrunerLlavaConfig
    MFPrunerLlavaNextConfig = _configuration.MFPrunerLlavaNextConfig
    _core = import_module("mfpruner_core")
    LAYOUT_GRID, LAYOUT_NEWLINE, MFPrunerResult = _core.LAYOUT_GRID, _core.LAYOUT_NEWLINE, _core.MFPrunerResult
    attention_from_query, check_image_tokens = _core.attention_from_query, _core.check_image_tokens
    grid_layout, select_best_resolution = _core.grid_layout, _core.select_best_resolution
    _pipeline = import_module("mfpruner_pipeline")
    current_cue_capture, EncodedPrompt = _pipeline.current_cue_capture, _pipeline.EncodedPrompt
    MFPrunerPipelineMixin, VisualItem = _pipeline.MFPrunerPipelineMixin, _pipeline.VisualItem
    cue_capture, register_stock_key_layout = _pipeline.cue_capture, _pipeline.register_stock_key_layout

# ----------------------------------------------------------------------------- anyres geometry
# Small helpers of the stock LLaVA-NeXT code, copied so that the shipped file imports only public
# transformers API (exported repos keep this code; a rename inside transformers must not break them).
# select_best_resolution lives in mfpruner_core (the drawing code replays it too).


def as_size_list(image_size) -> list:
    return list(image_size) if isinstance(image_size, (list, tuple)) else image_size.tolist()


# Copied from transformers.models.llava_next.modeling_llava_next.get_anyres_image_grid_shape (v5.24)
def get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size):
    """(rows, cols) of high-res tiles the processor cut an image of `image_size` (height, width) into."""
    height, width = select_best_resolution(as_size_list(image_size), grid_pinpoints)
    return height // patch_size, width // patch_size


# Copied from transformers.models.llava_next.modeling_llava_next.image_size_to_num_patches (v5.24)
def image_size_to_num_patches(image_size, grid_pinpoints, patch_size: int) -> int:
    """Tiles of one image: the high-res grid plus the base tile."""
    height, width = select_best_resolution(as_size_list(image_size), grid_pinpoints)
    return len(range(0, height, patch_size)) * len(range(0, width, patch_size)) + 1


@dataclass
class EncodedImages:
    """The vision side of one call, per image i (N_i visual tokens, in prompt order).

    tokens[i]: (N_i, D) projected tokens, exactly what the stock model scatters into the prompt.
    attention[i]: (N_i,) raw [CLS] attention of the token's tile (0 where not a candidate).
    select_features[i]: (N_i, C) select-layer vision features (for the CLIP relevance cue; None
        when the model has no CLIP text tower and does not need them).
    candidates[i]: (N_i,) bool, the tokens that compete for the budget.
    vision_output: the stock `get_image_features` output (returned as `image_outputs`).
    """

    tokens: list[torch.Tensor]
    attention: list[torch.Tensor]
    select_features: list[torch.Tensor | None]
    candidates: list[torch.Tensor]
    grids: list[tuple[int, int]]
    base_grids: list[tuple[int, int]]
    layouts: list[torch.Tensor]
    vision_output: object = None


# ----------------------------------------------------------------------------- cue capture


def clip_encoder_layer_index(select_layer: int, num_layers: int) -> int:
    """hidden_states[s] is the output of encoder layer s - 1 (hidden_states[0] = embeddings)."""
    index = (select_layer % (num_layers + 1)) - 1
    if index < 0:
        raise ValueError(f"`vision_feature_layer`={select_layer} selects the embeddings; MFPruner needs an encoder layer")
    return index


def install_clip_cue_hooks(vision_tower, select_layer: int) -> list:
    """Hooks the select layer of a CLIP vision tower, once. While a capture buffer is active
    (mfpruner_pipeline.cue_capture) they fill it with: "q_cls" (B, H, Dh) the [CLS] query, "k"
    (B, H, T, Dh) the keys, "hidden" (B, T, C) the layer's output (T = 1 + patches); otherwise
    they return at once. Any attention implementation works: they read the projections, not
    the attention weights. Returns the hook handles."""
    layers = vision_tower.encoder.layers
    layer = layers[clip_encoder_layer_index(select_layer, len(layers))]
    attention = layer.self_attn

    def heads(x):  # (B, T, C) -> (B, H, T, Dh)
        return x.detach().view(x.shape[0], x.shape[1], attention.num_heads, attention.head_dim).transpose(1, 2)

    def on_query(module, args, out):
        if (captured := current_cue_capture()) is not None:
            captured["q_cls"] = heads(out[:, :1])[:, :, 0]

    def on_keys(module, args, out):
        if (captured := current_cue_capture()) is not None:
            captured["k"] = heads(out)

    def on_layer(module, args, out):
        if (captured := current_cue_capture()) is not None:
            captured["hidden"] = (out[0] if isinstance(out, tuple) else out).detach()

    return [
        attention.q_proj.register_forward_hook(on_query),
        attention.k_proj.register_forward_hook(on_keys),
        layer.register_forward_hook(on_layer),
    ]


@contextmanager
def capture_clip_select_layer(vision_tower, select_layer: int):
    """For a bare CLIP vision tower (tools, tests): hooks its select layer for the block and
    yields the filled capture dict. The MFPruner models install their hooks once instead."""
    handles = install_clip_cue_hooks(vision_tower, select_layer)
    try:
        with cue_capture() as captured:
            yield captured
    finally:
        for handle in handles:
            handle.remove()


def clip_cls_attention(captured: dict, scale: float, keep_cls: bool) -> torch.Tensor:
    """[CLS] attention of each tile over its feature tokens, (tiles, T) -> (tiles, N): probabilities,
    not normalised (the model normalises over all of an image's candidate tokens)."""
    attention = attention_from_query(captured["q_cls"], captured["k"], scale)
    return attention if keep_cls else attention[:, 1:]


def select_layer_index(config) -> int:
    """The vision layer cue A reads: the config's select layer (the last one when it lists several)."""
    layer = config.vision_feature_layer
    return layer[-1] if isinstance(layer, (list, tuple)) else layer


# ----------------------------------------------------------------------------- models


class MFPrunerMixin(MFPrunerPipelineMixin):
    """What the LLaVA-family MFPruner models share: the cue hooks, the optional CLIP text tower,
    and the step from `encode_images` (per family) to the pipeline's `EncodedPrompt`."""

    pixel_input_names = ("pixel_values",)
    visual_input_names = ("pixel_values", "image_sizes")

    def __init__(self, config):
        super().__init__(config)
        if config.clip_text_config is not None:  # the paper's relevance cue: CLIP text tower + visual projection
            text_config = CLIPTextConfig(**config.clip_text_config)
            self.clip_text_model = CLIPTextModelWithProjection(text_config)
            self.clip_visual_projection = nn.Linear(
                config.vision_config.hidden_size, text_config.projection_dim, bias=False
            )
            # First in module order, so that device_map="auto" puts them with the vision tower
            # (the first module of `model`), not after lm_head on the last device.
            for name, module in list(self.named_children()):
                if name not in ("clip_text_model", "clip_visual_projection"):
                    delattr(self, name)  # re-added last: the stock modules now follow the CLIP ones
                    setattr(self, name, module)
            self.post_init()
        install_clip_cue_hooks(self.model.vision_tower, select_layer_index(config))

    def encode_images(self, pixel_values, image_sizes=None) -> EncodedImages:
        raise NotImplementedError

    def clip_image_embeddings(self, select_features):
        """Select-layer features (n, C) -> (n, E) in CLIP's joint space (the paper's cue C)."""
        normed = self.model.vision_tower.post_layernorm(select_features)
        weight = self.clip_visual_projection.weight
        return self.clip_visual_projection(normed.to(weight.device, weight.dtype))

    def encode_visual(self, input_ids, inputs_embeds, attention_mask, visual: dict, cues: list[str]) -> EncodedPrompt:
        """Vision tower (with the cue capture) -> tokens scattered into the prompt embeddings."""
        pixel_values, image_sizes = visual["pixel_values"], visual["image_sizes"]
        image_token_id = self.config.image_token_id
        if not (input_ids == image_token_id).any():
            check_image_tokens(input_ids, image_token_id, len(pixel_values), [1])  # raises the clear error
        images = self.encode_images(pixel_values, image_sizes)
        tokens_per_image = [len(t) for t in images.tokens]
        rows = check_image_tokens(input_ids, image_token_id, len(tokens_per_image), tokens_per_image)

        visual_tokens = torch.cat(images.tokens).to(inputs_embeds.device, inputs_embeds.dtype)
        is_image = (input_ids == image_token_id).to(inputs_embeds.device)
        inputs_embeds = inputs_embeds.masked_scatter(is_image[..., None], visual_tokens)
        items = [
            VisualItem(
                kind="image",
                token_id=image_token_id,
                row=row,
                tokens=images.tokens[i],
                attention=images.attention[i],
                select_features=images.select_features[i],
                candidates=images.candidates[i],
                grid=images.grids[i],
                base_grid=images.base_grids[i],
                layout=images.layouts[i],
            )
            for i, row in enumerate(rows)
        ]
        return EncodedPrompt(inputs_embeds=inputs_embeds, items=items, vision_outputs={"image_outputs": images.vision_output})


class MFPrunerLlavaForConditionalGeneration(MFPrunerMixin, LlavaForConditionalGeneration, GenerationMixin):
    """LLaVA-1.5 with MFPruner: one 336 px tile per image, N = 576 tokens, all of them candidates."""

    config_class = MFPrunerLlavaConfig
    token_layout = "center_crop"  # token -> image region: mfpruner_visualize.TOKEN_LAYOUTS

    def encode_images(self, pixel_values, image_sizes=None) -> EncodedImages:
        """Runs the vision tower once, capturing the select layer."""
        keep_cls = self.config.vision_feature_select_strategy == "full"
        vision = self.model.vision_tower
        with cue_capture() as captured:  # filled by the hooks installed in __init__
            output = self.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
        features = list(output.pooler_output)  # I x (N, D)
        attention = clip_cls_attention(captured, vision.encoder.layers[0].self_attn.scale, keep_cls)  # (I, N)
        hidden = captured["hidden"] if keep_cls else captured["hidden"][:, 1:]  # (I, N, C)
        tokens = features[0].shape[0]
        side = int(round(tokens**0.5))
        grid = (side, tokens // side)
        return EncodedImages(
            tokens=features,
            attention=list(attention),
            select_features=list(hidden),
            candidates=[torch.ones(tokens, dtype=torch.bool, device=attention.device)] * len(features),
            grids=[grid] * len(features),
            base_grids=[grid] * len(features),
            layouts=[grid_layout(*grid, device=attention.device)] * len(features),
            vision_output=output,
        )


class MFPrunerLlavaNextForConditionalGeneration(MFPrunerMixin, LlavaNextForConditionalGeneration, GenerationMixin):
    """LLaVA-1.6 (LLaVA-NeXT, anyres) with MFPruner.

    Each image is a base tile (the whole image at one tile's size) plus a grid of high-res tiles;
    the stock model packs them as: the base tile's tokens, then the unpadded high-res grid row by
    row, each row closed by an `image_newline` token. Cue A is the [CLS] attention of each tile's
    select layer, packed with the model's own `pack_image_features`, so every score lines up with
    its packed token by construction; it is min-max normalised over the whole image. Uniqueness and
    relevance are computed over all the image's packed patch tokens (base + grid) together.

    Budget: per image, over all its patch tokens (base + grid): `visual_token_budget` tokens, or
    `visual_token_ratio` of them (default 0.222; paper-comparable 0.222 / 0.111 / 0.056).

    Newline tokens: every `image_newline` is KEPT, as a row separator, OUTSIDE the budget; they do
    not vote (they are one learned vector repeated, with no [CLS] attention). The language model
    then sees the kept patch tokens in their raster order with the row structure the model was
    trained on: a 672x672 image at ratio 0.056 gives 161 patch tokens + 48 newlines.
    `last_pruning.layouts` tells base / grid / newline tokens apart (see `MFPrunerResult`).
    """

    config_class = MFPrunerLlavaNextConfig
    token_layout = "anyres"  # token -> image region: mfpruner_visualize.TOKEN_LAYOUTS

    def encode_images(self, pixel_values, image_sizes=None) -> EncodedImages:
        """Runs the vision tower once over every tile, capturing the select layer; packs the
        per-tile cue and provenance maps exactly like the features."""
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs `image_sizes` (I, 2) with `pixel_values`; the processor returns them")
        config = self.config
        keep_cls = config.vision_feature_select_strategy == "full"
        vision = self.model.vision_tower
        with cue_capture() as captured:  # filled by the hooks installed in __init__
            output = self.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
        features = output.pooler_output
        attention = clip_cls_attention(captured, vision.encoder.layers[0].self_attn.scale, keep_cls)  # (tiles, P)
        hidden = captured["hidden"] if keep_cls else captured["hidden"][:, 1:]  # (tiles, P, C)

        tile_size = config.vision_config.image_size
        side = tile_size // config.vision_config.patch_size  # patch rows (= cols) per tile
        tiles_per_image = [image_size_to_num_patches(size, config.image_grid_pinpoints, tile_size) for size in image_sizes]
        images = EncodedImages([], [], [], [], [], [], [], vision_output=output)
        for i, (tile_attention, tile_hidden) in enumerate(
            zip(attention.split(tiles_per_image), hidden.split(tiles_per_image))
        ):
            sizes = image_sizes[i : i + 1]
            # Per tile and patch: (attention, part, row, col) in float32, row/col in the padded grid.
            _, grid_cols = get_anyres_image_grid_shape(image_sizes[i], config.image_grid_pinpoints, tile_size)
            tile = torch.arange(len(tile_attention), device=attention.device)[:, None]  # (t, 1)
            patch = torch.arange(side * side, device=attention.device)[None, :]  # (1, P)
            tile_row, tile_col = (tile - 1).clamp(min=0) // grid_cols, (tile - 1).clamp(min=0) % grid_cols
            is_grid = (tile > 0).expand(-1, side * side)
            row = torch.where(is_grid, tile_row * side + patch // side, patch // side)
            col = torch.where(is_grid, tile_col * side + patch % side, patch % side)
            meta = torch.stack([tile_attention.float(), is_grid.float(), row.float(), col.float()], dim=-1)
            newline = torch.tensor([0.0, LAYOUT_NEWLINE, -1.0, -1.0], device=attention.device)
            (packed,), _ = self.model.pack_image_features([meta], sizes, config.vision_feature_select_strategy, newline)
            packed_hidden = None  # only the CLIP-text relevance cue reads the select-layer features
            if hasattr(self, "clip_text_model"):
                (packed_hidden,), _ = self.model.pack_image_features(
                    [tile_hidden], sizes, config.vision_feature_select_strategy, tile_hidden.new_zeros(tile_hidden.shape[-1])
                )
            part, row, col = packed[:, 1].long(), packed[:, 2].long(), packed[:, 3].long()
            is_newline = part == LAYOUT_NEWLINE
            on_grid = part == LAYOUT_GRID
            if on_grid.any():  # unpadding cut rows / cols: number them from the unpadded grid's corner
                row = torch.where(on_grid, row - row[on_grid].min(), row)
                col = torch.where(on_grid, col - col[on_grid].min(), col)
            # A newline closes the row of the token before it.
            previous_row = torch.cat([row.new_zeros(1), row[:-1]])
            row = torch.where(is_newline, previous_row, row)
            col = torch.where(is_newline, torch.full_like(col, -1), col)
            rows_cols = (row[on_grid].max() + 1, col[on_grid].max() + 1) if on_grid.any() else (side, side)

            images.tokens.append(features[i])
            images.attention.append(packed[:, 0])
            images.select_features.append(packed_hidden)
            images.candidates.append(~is_newline)
            images.grids.append(tuple(int(n) for n in rows_cols))
            images.base_grids.append((side, side))
            images.layouts.append(torch.stack([part, row, col], dim=-1))
        return images


register_stock_key_layout(MFPrunerLlavaForConditionalGeneration, "llava")
register_stock_key_layout(MFPrunerLlavaNextForConditionalGeneration, "llava_next")
MFPrunerLlavaConfig.register_for_auto_class()
MFPrunerLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
MFPrunerLlavaNextConfig.register_for_auto_class()
MFPrunerLlavaNextForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "MFPrunerLlavaForConditionalGeneration",
    "MFPrunerLlavaNextForConditionalGeneration",
    "MFPrunerResult",
]
