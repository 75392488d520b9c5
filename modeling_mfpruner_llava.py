"""MFPruner for LLaVA-1.5 (llava-hf/llava-1.5-7b-hf, -13b-hf) and LLaVA-1.6 / LLaVA-NeXT
(llava-hf/llava-v1.6-vicuna-7b-hf and the other LlavaNextForConditionalGeneration checkpoints).

The path, top to bottom:
  pixels -> CLIP vision tower, with hooks on the select layer ([CLS] query, keys, features)
         -> projector (LLaVA-NeXT: + packing of the tiles) -> visual tokens scattered into the
            prompt embeddings
         -> cues (attention, uniqueness, relevance) -> vote per image (mfpruner_core) -> keep mask
         -> drop pruned image positions (embeddings, mask, labels), re-pad -> language model.

`MFPrunerMixin` holds all of that; each model class only says how its images become visual
tokens plus per-token cue inputs (`encode_images`). `generate()` prunes once, then runs the
stock `generate()` on the kept embeddings, so the prefill and the KV cache are truly shorter.
`forward(pixel_values=...)` prunes the same way (logits have the pruned length; `labels` are
pruned with the tokens).

After each pruning call `model.last_pruning` holds an `MFPrunerResult`: per image, the kept
indices into its visual tokens, each cue's scores, and where each token comes from.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

try:
    from .configuration_mfpruner import MFPrunerLlavaConfig, MFPrunerLlavaNextConfig, validate_mfpruner_settings
    from .mfpruner_core import (
        LAYOUT_GRID,
        LAYOUT_NEWLINE,
        MFPrunerResult,
        attention_from_query,
        auto_map_with_auto_model,
        check_image_tokens,
        grid_layout,
        keep_mask_for_images,
        restore_prompt,
        vote_candidates,
        call_budget,
        call_min_votes,
        clip_text_relevance,
        compact_rows,
        llm_relevance,
        min_max_normalize,
        uniqueness,
    )
except ImportError:  # imported as a top-level module (tests, tools)
    from configuration_mfpruner import MFPrunerLlavaConfig, MFPrunerLlavaNextConfig, validate_mfpruner_settings
    from mfpruner_core import (
        LAYOUT_GRID,
        LAYOUT_NEWLINE,
        MFPrunerResult,
        attention_from_query,
        auto_map_with_auto_model,
        check_image_tokens,
        grid_layout,
        keep_mask_for_images,
        restore_prompt,
        vote_candidates,
        call_budget,
        call_min_votes,
        clip_text_relevance,
        compact_rows,
        llm_relevance,
        min_max_normalize,
        uniqueness,
    )



@dataclass
class EncodedImages:
    """The vision side of one call, per image i (N_i visual tokens, in prompt order).

    tokens[i]: (N_i, D) projected tokens, exactly what the stock model scatters into the prompt.
    attention[i]: (N_i,) raw [CLS] attention of the token's tile (0 where not a candidate).
    select_features[i]: (N_i, C) select-layer vision features (for the CLIP relevance cue; None
        when the model has no CLIP text tower and does not need them).
    candidates[i]: (N_i,) bool, the tokens that compete for the budget.
    """

    tokens: list[torch.Tensor]
    attention: list[torch.Tensor]
    select_features: list[torch.Tensor | None]
    candidates: list[torch.Tensor]
    grids: list[tuple[int, int]]
    base_grids: list[tuple[int, int]]
    layouts: list[torch.Tensor]


# ----------------------------------------------------------------------------- cue capture


def clip_encoder_layer_index(select_layer: int, num_layers: int) -> int:
    """hidden_states[s] is the output of encoder layer s - 1 (hidden_states[0] = embeddings)."""
    index = (select_layer % (num_layers + 1)) - 1
    if index < 0:
        raise ValueError(f"`vision_feature_layer`={select_layer} selects the embeddings; MFPruner needs an encoder layer")
    return index


@contextmanager
def capture_clip_select_layer(vision_tower, select_layer: int):
    """Hooks the select layer of a CLIP vision tower for one forward pass.

    Yields a dict that fills with: "q_cls" (B, H, Dh) the [CLS] query, "k" (B, H, T, Dh) the
    keys, "hidden" (B, T, C) the layer's output (T = 1 + patches). Works under any attention
    implementation, since it reads the projections, not the attention weights.
    """
    layers = vision_tower.encoder.layers
    layer = layers[clip_encoder_layer_index(select_layer, len(layers))]
    attention = layer.self_attn
    captured = {}

    def heads(x):  # (B, T, C) -> (B, H, T, Dh)
        return x.detach().view(x.shape[0], x.shape[1], attention.num_heads, attention.head_dim).transpose(1, 2)

    handles = [
        attention.q_proj.register_forward_hook(lambda m, i, out: captured.__setitem__("q_cls", heads(out[:, :1])[:, :, 0])),
        attention.k_proj.register_forward_hook(lambda m, i, out: captured.__setitem__("k", heads(out))),
        layer.register_forward_hook(
            lambda m, i, out: captured.__setitem__("hidden", (out[0] if isinstance(out, tuple) else out).detach())
        ),
    ]
    try:
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


# ----------------------------------------------------------------------------- prompt bookkeeping


def scatter_to_all(score: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(n,) candidate scores -> (N,) with 0 at the non-candidate positions."""
    full = torch.zeros(candidates.shape, dtype=score.dtype, device=score.device)
    full[candidates] = score
    return full


# ----------------------------------------------------------------------------- models


class MFPrunerMixin:
    """Everything the LLaVA-family MFPruner models share: the cues, the per-image vote, the splice,
    and the generate() / forward() entry points. A model class puts this mixin before its stock
    class and implements `encode_images(pixel_values, image_sizes) -> EncodedImages`."""

    def __init__(self, config):
        super().__init__(config)
        self.last_pruning: MFPrunerResult | None = None
        if config.clip_text_config is not None:  # the paper's relevance cue: CLIP text tower + visual projection
            text_config = CLIPTextConfig(**config.clip_text_config)
            self.clip_text_model = CLIPTextModelWithProjection(text_config)
            self.clip_visual_projection = nn.Linear(
                config.vision_config.hidden_size, text_config.projection_dim, bias=False
            )
            self.post_init()

    def encode_images(self, pixel_values, image_sizes=None) -> EncodedImages:
        raise NotImplementedError

    # -- cues -------------------------------------------------------------------------------

    def clip_text_embeddings(self, clip_input_ids, clip_attention_mask):
        """CLIP text tower on the instruction segments: (B, M, T) ids -> ((B, M, E) embeddings,
        (B, M) bool, which segments are real)."""
        batch, segments, length = clip_input_ids.shape
        if clip_attention_mask is None:
            clip_attention_mask = torch.ones_like(clip_input_ids)
        text = self.clip_text_model(
            input_ids=clip_input_ids.reshape(-1, length), attention_mask=clip_attention_mask.reshape(-1, length)
        ).text_embeds.view(batch, segments, -1)
        return text, clip_attention_mask.bool().any(dim=-1)

    def clip_text_relevance_scores(self, select_features, text, segment_mask):
        """Paper's cue C for one image: (n, C) select-layer features vs (M, E) text segments -> (n,)."""
        image = self.clip_visual_projection(self.model.vision_tower.post_layernorm(select_features))  # (n, E)
        return clip_text_relevance(image[None], text[None].to(image.dtype), segment_mask[None])[0]

    def relevance_source(self, clip_input_ids) -> str:
        has_tower = hasattr(self, "clip_text_model")
        source = self.config.relevance_source
        if source == "clip_text" and (not has_tower or clip_input_ids is None):
            raise ValueError(
                "relevance_source='clip_text' needs a model with a CLIP text tower (config.clip_text_config) "
                "and `clip_input_ids` in the call (the processor of an MFPruner repo makes them)"
            )
        if source == "auto":
            return "clip_text" if has_tower and clip_input_ids is not None else "llm"
        return source

    def image_cues(self, images: EncodedImages, i: int, row: int, inputs_embeds, text_mask, clip_text):
        """Image i's cues over its candidate tokens: {name: (n,)}. Cue A is min-max normalised over
        the image's candidates (all its tiles together); uniqueness and relevance see all of them."""
        candidates = images.candidates[i]
        visual = images.tokens[i][candidates][None]  # (1, n, D)
        cues = {}
        for name in self.config.mfpruner_cues:
            if name == "attention":
                cues[name] = min_max_normalize(images.attention[i][candidates][None])[0]
            elif name == "uniqueness":
                cues[name] = uniqueness(visual)[0]
            elif clip_text is not None:
                text, segment_mask = clip_text
                cues[name] = self.clip_text_relevance_scores(
                    images.select_features[i][candidates], text[row], segment_mask[row]
                )
            else:
                cues[name] = llm_relevance(visual, inputs_embeds[row][None], text_mask[row][None])[0]
        return cues

    # -- pruning ----------------------------------------------------------------------------

    def prune_inputs(
        self,
        input_ids,
        pixel_values,
        attention_mask=None,
        labels=None,
        image_sizes=None,
        visual_token_budget=None,
        visual_token_ratio=None,
        clip_input_ids=None,
        clip_attention_mask=None,
        left_pad: bool | None = None,
        min_votes: int | None = None,
    ) -> dict:
        """Encodes the images, votes per image, and returns the pruned language-model inputs:
        input_ids, inputs_embeds, attention_mask (and labels), re-padded. The budget and
        `min_votes` arguments override the config's for this call."""
        validate_mfpruner_settings(self.config)  # the config may have been edited since loading
        budget, ratio = call_budget(
            self.config.visual_token_budget, self.config.visual_token_ratio, visual_token_budget, visual_token_ratio
        )
        min_votes = call_min_votes(self.config.min_votes, min_votes)
        image_token_id = self.config.image_token_id
        if input_ids is None or not (input_ids == image_token_id).any():
            check_image_tokens(input_ids, image_token_id, len(pixel_values), [1])  # raises the clear error
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        images = self.encode_images(pixel_values, image_sizes)
        tokens_per_image = [len(t) for t in images.tokens]
        image_to_row = check_image_tokens(input_ids, image_token_id, len(tokens_per_image), tokens_per_image)

        inputs_embeds = self.get_input_embeddings()(input_ids)
        is_image = input_ids == image_token_id
        visual = torch.cat(images.tokens).to(inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(is_image[..., None], visual)

        with torch.no_grad():
            source = self.relevance_source(clip_input_ids) if "relevance" in self.config.mfpruner_cues else None
            clip_text = self.clip_text_embeddings(clip_input_ids, clip_attention_mask) if source == "clip_text" else None
            text_mask = attention_mask.bool() & ~is_image
            keep_indices, cue_scores = [], {name: [] for name in self.config.mfpruner_cues}
            for i, row in enumerate(image_to_row):  # per image: token counts may differ
                cues = self.image_cues(images, i, row, inputs_embeds, text_mask, clip_text)
                candidates = images.candidates[i]
                keep_indices.append(
                    vote_candidates(cues, candidates, budget, ratio, min_votes, self.config.fill_by)
                )
                for name, score in cues.items():
                    cue_scores[name].append(scatter_to_all(score, candidates).cpu())

        keep = keep_mask_for_images(is_image, keep_indices, tokens_per_image)
        if left_pad is None:  # keep the caller's padding side
            left_pad = not bool((attention_mask[:, -1] == 0).any())
        pad_id = self.config.text_config.pad_token_id
        tensors = {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        pads = {"input_ids": pad_id if pad_id is not None else 0, "inputs_embeds": 0.0, "attention_mask": 0}
        if labels is not None:
            tensors["labels"], pads["labels"] = labels, -100
        pruned, _ = compact_rows(keep, tensors, pads, left=left_pad)

        self.last_pruning = MFPrunerResult(
            keep_indices=[idx.cpu() for idx in keep_indices],
            cue_scores=cue_scores,
            num_visual_tokens=tokens_per_image,
            image_to_row=image_to_row,
            lm_input_length=pruned["input_ids"].shape[1],
            grids=images.grids,
            base_grids=images.base_grids,
            layouts=[layout.cpu() for layout in images.layouts],
        )
        return pruned

    # -- entry points -----------------------------------------------------------------------

    def save_pretrained(self, *args, **kwargs):
        self.config.auto_map = auto_map_with_auto_model(getattr(self.config, "auto_map", None), self)
        return super().save_pretrained(*args, **kwargs)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        labels=None,
        image_sizes=None,
        visual_token_budget: int | None = None,
        visual_token_ratio: float | None = None,
        prune_visual_tokens: bool | None = None,
        clip_input_ids=None,
        clip_attention_mask=None,
        min_votes: int | None = None,
        **kwargs,
    ):
        """Stock forward; with `pixel_values` the visual tokens are pruned first (logits and the
        loss then cover the pruned sequence; `labels` are pruned with it)."""
        prune = self.config.prune_visual_tokens if prune_visual_tokens is None else prune_visual_tokens
        if pixel_values is None or not prune:
            if image_sizes is not None:  # only passed on when given: LLaVA-1.5 ignores it
                kwargs["image_sizes"] = image_sizes
            return super().forward(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, labels=labels, **kwargs
            )
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("pass `input_ids`, not `inputs_embeds`, with `pixel_values`: MFPruner locates image tokens by id")
        pruned = self.prune_inputs(
            input_ids,
            pixel_values,
            attention_mask=attention_mask,
            labels=labels,
            image_sizes=image_sizes,
            visual_token_budget=visual_token_budget,
            visual_token_ratio=visual_token_ratio,
            clip_input_ids=clip_input_ids,
            clip_attention_mask=clip_attention_mask,
            min_votes=min_votes,
        )
        kwargs.pop("position_ids", None)  # renumbered over the pruned sequence, as in generate()
        mask = pruned["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return super().forward(
            inputs_embeds=pruned["inputs_embeds"],
            attention_mask=mask,
            position_ids=position_ids,
            labels=pruned.get("labels"),
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        visual_token_budget: int | None = None,
        visual_token_ratio: float | None = None,
        prune_visual_tokens: bool | None = None,
        clip_input_ids=None,
        clip_attention_mask=None,
        min_votes: int | None = None,
        **kwargs,
    ):
        """Stock generate on the pruned prompt. Returns the original (unpruned) prompt followed by
        the new tokens, as the stock model does, so `out[:, input_ids.shape[1]:]` is the answer."""
        prune = self.config.prune_visual_tokens if prune_visual_tokens is None else prune_visual_tokens
        if pixel_values is None or not prune:  # the stock path; forward() must not prune either
            return super().generate(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                prune_visual_tokens=False,
                **kwargs,
            )
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("pass `input_ids`, not `inputs_embeds`, with `pixel_values`: MFPruner locates image tokens by id")
        pruned = self.prune_inputs(
            input_ids,
            pixel_values,
            attention_mask=attention_mask,
            image_sizes=kwargs.pop("image_sizes", None),
            visual_token_budget=visual_token_budget,
            visual_token_ratio=visual_token_ratio,
            clip_input_ids=clip_input_ids,
            clip_attention_mask=clip_attention_mask,
            left_pad=True,
            min_votes=min_votes,
        )
        output = super().generate(**pruned, **kwargs)
        return restore_prompt(output, input_ids, pruned["input_ids"].shape[1])


class MFPrunerLlavaForConditionalGeneration(MFPrunerMixin, LlavaForConditionalGeneration):
    """LLaVA-1.5 with MFPruner: one 336 px tile per image, N = 576 tokens, all of them candidates."""

    config_class = MFPrunerLlavaConfig

    def encode_images(self, pixel_values, image_sizes=None) -> EncodedImages:
        """Runs the vision tower once with the select layer hooked."""
        keep_cls = self.config.vision_feature_select_strategy == "full"
        vision = self.model.vision_tower
        with capture_clip_select_layer(vision, select_layer_index(self.config)) as captured:
            features = self.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output
        features = list(features)  # I x (N, D)
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
        )


class MFPrunerLlavaNextForConditionalGeneration(MFPrunerMixin, LlavaNextForConditionalGeneration):
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

    def encode_images(self, pixel_values, image_sizes=None) -> EncodedImages:
        """Runs the vision tower once over every tile with the select layer hooked; packs the
        per-tile cue and provenance maps exactly like the features."""
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs `image_sizes` (I, 2) with `pixel_values`; the processor returns them")
        config = self.config
        keep_cls = config.vision_feature_select_strategy == "full"
        vision = self.model.vision_tower
        with capture_clip_select_layer(vision, select_layer_index(config)) as captured:
            features = self.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output
        attention = clip_cls_attention(captured, vision.encoder.layers[0].self_attn.scale, keep_cls)  # (tiles, P)
        hidden = captured["hidden"] if keep_cls else captured["hidden"][:, 1:]  # (tiles, P, C)

        tile_size = config.vision_config.image_size
        side = tile_size // config.vision_config.patch_size  # patch rows (= cols) per tile
        tiles_per_image = [image_size_to_num_patches(size, config.image_grid_pinpoints, tile_size) for size in image_sizes]
        images = EncodedImages([], [], [], [], [], [], [])
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


# Hub checkpoints and stock save_pretrained use the old key layout; without this mapping the
# weights of a custom class silently load as random (see TRANSFORMERS_NOTES.md).
register_checkpoint_conversion_mapping(
    MFPrunerLlavaForConditionalGeneration.__name__, get_checkpoint_conversion_mapping("llava"), overwrite=True
)
register_checkpoint_conversion_mapping(
    MFPrunerLlavaNextForConditionalGeneration.__name__, get_checkpoint_conversion_mapping("llava_next"), overwrite=True
)
MFPrunerLlavaConfig.register_for_auto_class()
MFPrunerLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
MFPrunerLlavaNextConfig.register_for_auto_class()
MFPrunerLlavaNextForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "MFPrunerLlavaForConditionalGeneration",
    "MFPrunerLlavaNextForConditionalGeneration",
    "MFPrunerResult",
]
