"""MFPruner for LLaVA-1.5 (llava-hf/llava-1.5-7b-hf, -13b-hf).

The path, top to bottom:
  pixels -> CLIP vision tower, with hooks on the select layer ([CLS] query, keys, features)
         -> projector -> visual tokens scattered into the prompt embeddings
         -> cues (attention, uniqueness, relevance) -> vote (mfpruner_core) -> keep mask
         -> drop pruned image positions (embeddings, mask, labels), re-pad -> language model.

`generate()` prunes once, then runs the stock `generate()` on the kept embeddings, so the
prefill and the KV cache are truly shorter. `forward(pixel_values=...)` prunes the same way
(logits have the pruned length; `labels` are pruned with the tokens).

After each pruning call `model.last_pruning` holds an `MFPrunerResult`: per image, the kept
indices into its visual tokens and each cue's scores.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, LlavaForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

try:
    from .configuration_mfpruner import MFPrunerLlavaConfig
    from .mfpruner_core import (
        MFPrunerResult,
        attention_from_query,
        auto_map_with_auto_model,
        call_budget,
        check_image_tokens,
        clip_text_relevance,
        compact_rows,
        keep_mask_for_images,
        llm_relevance,
        min_max_normalize,
        resolve_budget,
        restore_prompt,
        select_tokens,
        uniqueness,
    )
except ImportError:  # imported as a top-level module (tests, tools)
    from configuration_mfpruner import MFPrunerLlavaConfig
    from mfpruner_core import (
        MFPrunerResult,
        attention_from_query,
        auto_map_with_auto_model,
        call_budget,
        check_image_tokens,
        clip_text_relevance,
        compact_rows,
        keep_mask_for_images,
        llm_relevance,
        min_max_normalize,
        resolve_budget,
        restore_prompt,
        select_tokens,
        uniqueness,
    )



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
    attention = layers[clip_encoder_layer_index(select_layer, len(layers))].self_attn
    captured = {}

    def heads(x):  # (B, T, C) -> (B, H, T, Dh)
        return x.detach().view(x.shape[0], x.shape[1], attention.num_heads, attention.head_dim).transpose(1, 2)

    handles = [
        attention.q_proj.register_forward_hook(lambda m, i, out: captured.__setitem__("q_cls", heads(out[:, :1])[:, :, 0])),
        attention.k_proj.register_forward_hook(lambda m, i, out: captured.__setitem__("k", heads(out))),
        layers[clip_encoder_layer_index(select_layer, len(layers))].register_forward_hook(
            lambda m, i, out: captured.__setitem__("hidden", (out[0] if isinstance(out, tuple) else out).detach())
        ),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def clip_cls_attention(captured: dict, scale: float, keep_cls: bool) -> torch.Tensor:
    """[CLS] attention over the feature tokens, (B, T) -> (B, N), min-max normalised per image."""
    attention = attention_from_query(captured["q_cls"], captured["k"], scale)
    return min_max_normalize(attention if keep_cls else attention[:, 1:])


# ----------------------------------------------------------------------------- prompt bookkeeping


def llm_relevance_per_image(visual_tokens, inputs_embeds, text_mask, image_to_row):
    """LLM-space relevance of each image's tokens against its own row's prompt text."""
    rows = torch.as_tensor(image_to_row, device=inputs_embeds.device)
    return llm_relevance(visual_tokens, inputs_embeds[rows], text_mask[rows])


# ----------------------------------------------------------------------------- model


class MFPrunerLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = MFPrunerLlavaConfig

    def __init__(self, config: MFPrunerLlavaConfig):
        super().__init__(config)
        self.last_pruning: MFPrunerResult | None = None
        if config.clip_text_config is not None:  # the paper's relevance cue: CLIP text tower + visual projection
            text_config = CLIPTextConfig(**config.clip_text_config)
            self.clip_text_model = CLIPTextModelWithProjection(text_config)
            self.clip_visual_projection = nn.Linear(
                config.vision_config.hidden_size, text_config.projection_dim, bias=False
            )
            self.post_init()

    # -- cues -------------------------------------------------------------------------------

    def image_features_with_cues(self, pixel_values, image_sizes=None):
        """Runs the vision tower once. Returns ((I, N, D) projected tokens, (I, N) attention cue,
        (I, N, C) select-layer features for the CLIP relevance cue)."""
        layer = self.config.vision_feature_layer
        layer = layer[-1] if isinstance(layer, (list, tuple)) else layer  # cue A from the last listed layer
        keep_cls = self.config.vision_feature_select_strategy == "full"
        vision = self.model.vision_tower
        with capture_clip_select_layer(vision, layer) as captured:
            features = self.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output
        features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
        scale = vision.encoder.layers[0].self_attn.scale
        attention = clip_cls_attention(captured, scale, keep_cls)
        hidden = captured["hidden"] if keep_cls else captured["hidden"][:, 1:]
        return features, attention, hidden

    def clip_text_relevance_scores(self, select_features, clip_input_ids, clip_attention_mask, image_to_row):
        """Paper's cue C: CLIP text tower on the instruction segments vs projected patch features.

        clip_input_ids / clip_attention_mask: (B, M, T) - M window-sized segments per sample."""
        batch, segments, length = clip_input_ids.shape
        if clip_attention_mask is None:
            clip_attention_mask = torch.ones_like(clip_input_ids)
        text = self.clip_text_model(
            input_ids=clip_input_ids.reshape(-1, length), attention_mask=clip_attention_mask.reshape(-1, length)
        ).text_embeds.view(batch, segments, -1)  # (B, M, E)
        image = self.clip_visual_projection(self.model.vision_tower.post_layernorm(select_features))  # (I, N, E)
        rows = torch.as_tensor(image_to_row, device=image.device)
        segment_mask = clip_attention_mask.bool().any(dim=-1)  # (B, M)
        return clip_text_relevance(image, text[rows].to(image.dtype), segment_mask[rows])

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
    ) -> dict:
        """Encodes the images, votes, and returns the pruned language-model inputs:
        input_ids, inputs_embeds, attention_mask (and labels), re-padded."""
        budget, ratio = call_budget(
            self.config.visual_token_budget, self.config.visual_token_ratio, visual_token_budget, visual_token_ratio
        )
        image_token_id = self.config.image_token_id
        if input_ids is not None and pixel_values is not None and not (input_ids == image_token_id).any():
            check_image_tokens(input_ids, image_token_id, len(pixel_values), [1])  # raises the clear error
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        visual, attention, select_features = self.image_features_with_cues(pixel_values, image_sizes)
        num_images, tokens = visual.shape[:2]
        image_to_row = check_image_tokens(input_ids, image_token_id, num_images, [tokens] * num_images)

        inputs_embeds = self.get_input_embeddings()(input_ids)
        is_image = input_ids == image_token_id
        inputs_embeds = inputs_embeds.masked_scatter(is_image[..., None], visual.to(inputs_embeds.dtype))

        with torch.no_grad():
            cues = {}
            for name in self.config.mfpruner_cues:
                if name == "attention":
                    cues[name] = attention
                elif name == "uniqueness":
                    cues[name] = uniqueness(visual)
                elif self.relevance_source(clip_input_ids) == "clip_text":
                    cues[name] = self.clip_text_relevance_scores(
                        select_features, clip_input_ids, clip_attention_mask, image_to_row
                    )
                else:
                    text_mask = attention_mask.bool() & ~is_image
                    cues[name] = llm_relevance_per_image(visual, inputs_embeds, text_mask, image_to_row)
            k = resolve_budget(tokens, budget, ratio)
            min_votes = min(self.config.min_votes, len(cues))
            keep_indices = select_tokens(cues, k, min_votes, self.config.fill_by)  # (I, k)

        keep = keep_mask_for_images(is_image, list(keep_indices), [tokens] * num_images)
        if left_pad is None:  # keep the caller's padding side
            left_pad = not bool((attention_mask[:, -1] == 0).any())
        pad_id = self.config.text_config.pad_token_id
        tensors = {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        pads = {"input_ids": pad_id if pad_id is not None else 0, "inputs_embeds": 0.0, "attention_mask": 0}
        if labels is not None:
            tensors["labels"], pads["labels"] = labels, -100
        pruned, _ = compact_rows(keep, tensors, pads, left=left_pad)

        side = int(round(tokens**0.5))
        self.last_pruning = MFPrunerResult(
            keep_indices=[idx.cpu() for idx in keep_indices],
            cue_scores={name: [s.cpu() for s in score] for name, score in cues.items()},
            num_visual_tokens=[tokens] * num_images,
            image_to_row=image_to_row,
            lm_input_length=pruned["input_ids"].shape[1],
            grids=[(side, tokens // side)] * num_images,
            kinds=["image"] * num_images,
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
        visual_token_budget: int | None = None,
        visual_token_ratio: float | None = None,
        prune_visual_tokens: bool | None = None,
        clip_input_ids=None,
        clip_attention_mask=None,
        **kwargs,
    ):
        """Stock forward; with `pixel_values` the visual tokens are pruned first (logits and the
        loss then cover the pruned sequence; `labels` are pruned with it)."""
        prune = self.config.prune_visual_tokens if prune_visual_tokens is None else prune_visual_tokens
        if pixel_values is None or not prune:
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
            image_sizes=kwargs.pop("image_sizes", None),
            visual_token_budget=visual_token_budget,
            visual_token_ratio=visual_token_ratio,
            clip_input_ids=clip_input_ids,
            clip_attention_mask=clip_attention_mask,
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
        )
        output = super().generate(**pruned, **kwargs)
        return restore_prompt(output, input_ids, pruned["input_ids"].shape[1])


# Hub checkpoints and stock save_pretrained use the old key layout; without this mapping the
# weights of a custom class silently load as random (see TRANSFORMERS_NOTES.md).
register_checkpoint_conversion_mapping(
    MFPrunerLlavaForConditionalGeneration.__name__, get_checkpoint_conversion_mapping("llava"), overwrite=True
)
MFPrunerLlavaConfig.register_for_auto_class()
MFPrunerLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["MFPrunerLlavaForConditionalGeneration", "MFPrunerResult"]
