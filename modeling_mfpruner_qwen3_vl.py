"""MFPruner for Qwen3-VL (Qwen/Qwen3-VL-2B/4B/8B/32B-Instruct) and Qwen3-VL MoE (Qwen3-VL-30B-A3B,
235B-A22B): images, multi-image prompts, video.

The path, top to bottom:
  pixels -> vision tower (every block attends over a whole image, or one frame pair of a video);
            the LAST block's attention is a `CueCapturingQwen3VLVisionAttention`: the stock attention
            plus, while a capture buffer is active, the attention each patch receives (Qwen2.5-VL's
            code: `attention_and_received_per_patch`, query chunks, per attention segment)
         -> 2x2 patch merger -> visual tokens (raster order); DeepStack: the mergers of intermediate
            blocks (`deepstack_visual_indexes`) give one more feature per visual token per level
         -> cues, vote per image / video, splice, language model: mfpruner_pipeline.

Why the last block for cue A: Qwen3-VL's tower has no window attention (each block attends within a
whole image or frame pair, `cu_seqlens`), so the last block is a full-attention block, as cue A
needs, and it is the block whose output the merger turns into the language model's tokens (as for
Qwen2.5-VL, where the last block is the last full-attention one).

DeepStack: the stock language model adds the level-l features to the hidden states after its
layer l, at the visual positions (`visual_pos_masks`). Pruning gathers every level with the SAME
kept indices as the merged tokens (`gather_deepstack`); the pruned prefill hands the kept tokens and
kept levels to the stock forward() as `mm_encoder_outputs` (the stock generate() sends it with the
prefill only), so the stock code scatters the kept tokens into the placeholders of the pruned prompt
and builds the pruned `visual_pos_masks` itself. The prompt embeddings therefore keep the image /
video token's embedding at the visual positions (the stock placeholders) instead of the features.

M-RoPE (interleaved t, h, w frequencies in Qwen3-VL; the positions themselves are computed as for
Qwen2.5-VL): the positions of the UNPRUNED prompt are gathered at the kept positions, so every kept
token keeps its original (t, h, w) position; continuation positions are the stock ones (Qwen2.5-VL's
position methods, shared). Videos: the processor writes a timestamp before each frame pair's tokens;
the timestamps are text and stay; a video is pruned as a whole under one budget, as for Qwen2.5-VL.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionAttention

if __package__:  # remote code (transformers_modules.<repo>.<file>): the repo's own sibling files
    from .configuration_mfpruner import MFPrunerQwen3VLConfig, MFPrunerQwen3VLMoeConfig
    from .mfpruner_pipeline import EncodedPrompt, MFPrunerPipelineMixin, kept_vision_outputs, register_stock_key_layout
    from .modeling_mfpruner_qwen2_5_vl import (
        CueCapturingAttentionMixin,
        MFPrunerQwen2_5_VLForConditionalGeneration,
        install_cue_capture,
    )
else:  # a top-level module of a checkout (tests, tools, app.py). By module name: transformers' remote-code
    # check would demand that an absolute `from x import y` here name an installed package.
    from importlib import import_module

    _configuration = import_module("configuration_mfpruner")
    MFPrunerQwen3VLConfig = _configuration.MFPrunerQwen3VLConfig
    MFPrunerQwen3VLMoeConfig = _configuration.MFPrunerQwen3VLMoeConfig
    _pipeline = import_module("mfpruner_pipeline")
    EncodedPrompt, MFPrunerPipelineMixin = _pipeline.EncodedPrompt, _pipeline.MFPrunerPipelineMixin
    kept_vision_outputs, register_stock_key_layout = _pipeline.kept_vision_outputs, _pipeline.register_stock_key_layout
    _qwen2_5 = import_module("modeling_mfpruner_qwen2_5_vl")
    CueCapturingAttentionMixin = _qwen2_5.CueCapturingAttentionMixin
    MFPrunerQwen2_5_VLForConditionalGeneration = _qwen2_5.MFPrunerQwen2_5_VLForConditionalGeneration
    install_cue_capture = _qwen2_5.install_cue_capture


class CueCapturingQwen3VLVisionAttention(CueCapturingAttentionMixin, Qwen3VLVisionAttention):
    """Qwen3-VL's vision attention with cue A capture (same weights, stock forward outside a capture)."""


class CueCapturingQwen3VLMoeVisionAttention(CueCapturingAttentionMixin, Qwen3VLMoeVisionAttention):
    """Qwen3-VL MoE's vision attention (the same tower as the dense model's) with cue A capture."""


def gather_deepstack(levels, keep_indices: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """DeepStack levels of some items, each level gathered with the same kept indices as the items'
    merged tokens. levels: [level][item] (N_i, D); keep_indices: [item] (k_i,) -> [level][item] (k_i, D)."""
    return [[features[idx.to(features.device)] for features, idx in zip(level, keep_indices)] for level in levels]


class MFPrunerQwen3VLMixin:
    """Qwen3-VL's visual encoding (dense and MoE share it): per image (or video) its merged tokens,
    cue A from the last vision block, DeepStack levels kept with the same indices; the pipeline does
    the rest. A class sets `capturing_attention_class`."""

    capturing_attention_class = None
    pixel_input_names = ("pixel_values", "pixel_values_videos")
    visual_input_names = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids")

    # Qwen2.5-VL's encoding and M-RoPE positions serve Qwen3-VL unchanged (same stock inputs, same
    # `get_image_features` / `get_rope_index` calls); only `merged_attention` and `place_visual_tokens` differ.
    encode_visual = MFPrunerQwen2_5_VLForConditionalGeneration.encode_visual
    visual_features_with_attention = MFPrunerQwen2_5_VLForConditionalGeneration.visual_features_with_attention
    pruned_position_ids = MFPrunerQwen2_5_VLForConditionalGeneration.pruned_position_ids
    rope_deltas = MFPrunerQwen2_5_VLForConditionalGeneration.rope_deltas
    remember_prefill = MFPrunerQwen2_5_VLForConditionalGeneration.remember_prefill
    continuation_position_ids = MFPrunerQwen2_5_VLForConditionalGeneration.continuation_position_ids

    def __init__(self, config):
        super().__init__(config)
        self.cue_block = len(self.model.visual.blocks) - 1  # every Qwen3-VL block attends over the whole image
        install_cue_capture(self.model.visual.blocks[self.cue_block], self.capturing_attention_class)

    def merged_attention(self, received, grid_thw) -> torch.Tensor:
        """(S,) attention received per patch -> (S / 4,) per visual token: the mean over each merge group
        (contiguous in the processor's patch layout; Qwen3-VL's tower never reorders patches)."""
        return received.view(-1, self.config.vision_config.spatial_merge_size**2).mean(dim=-1)

    def place_visual_tokens(self, inputs_embeds, is_kind, features, token_id: int):
        """Writes the image / video token's own embedding at `is_kind`, not the features: the stock
        forward() scatters the kept tokens there from `mm_encoder_outputs` (see `prefill_inputs`)."""
        embed = self.get_input_embeddings()
        placeholder = embed(torch.tensor(token_id, device=is_kind.device)).to(inputs_embeds.device, inputs_embeds.dtype)
        return torch.where(is_kind.to(inputs_embeds.device)[..., None], placeholder, inputs_embeds)

    def prefill_inputs(self, encoded: EncodedPrompt, keep_indices: list[torch.Tensor]) -> dict:
        """`mm_encoder_outputs` of the pruned prefill: per kind, the vision output with the kept merged
        tokens (`pooler_output`) and every DeepStack level gathered with the same kept indices."""
        outputs = {}
        for name, output in kept_vision_outputs(encoded, keep_indices).items():
            kind = name.split("_")[0]  # "image_outputs" -> "image"
            kept = [idx for item, idx in zip(encoded.items, keep_indices) if item.kind == kind]
            if getattr(output, "deepstack_features", None) is not None:  # Qwen3.5's tower has no DeepStack
                output.deepstack_features = gather_deepstack(output.deepstack_features, kept)
            outputs[kind] = output
        return {"mm_encoder_outputs": outputs}


class MFPrunerQwen3VLForConditionalGeneration(
    MFPrunerQwen3VLMixin, MFPrunerPipelineMixin, Qwen3VLForConditionalGeneration, GenerationMixin
):
    """Qwen3-VL with MFPruner (see the module docstring)."""

    config_class = MFPrunerQwen3VLConfig
    token_layout = "smart_resize"  # token -> image region: mfpruner_visualize.TOKEN_LAYOUTS (Qwen2.5-VL's, 32 px tokens)
    capturing_attention_class = CueCapturingQwen3VLVisionAttention


class MFPrunerQwen3VLMoeForConditionalGeneration(
    MFPrunerQwen3VLMixin, MFPrunerPipelineMixin, Qwen3VLMoeForConditionalGeneration, GenerationMixin
):
    """Qwen3-VL MoE with MFPruner: the dense model's visual encoding; only the language model differs."""

    config_class = MFPrunerQwen3VLMoeConfig
    token_layout = "smart_resize"  # token -> image region: mfpruner_visualize.TOKEN_LAYOUTS (Qwen2.5-VL's, 32 px tokens)
    capturing_attention_class = CueCapturingQwen3VLMoeVisionAttention


# Qwen3-VL's hub checkpoints already use the module layout (`model.visual.*`, `model.language_model.*`,
# `lm_head.*`): transformers has no key renames for it. The MoE checkpoints store the experts in
# another layout: its stock conversion is registered for the MFPruner class.
register_stock_key_layout(MFPrunerQwen3VLMoeForConditionalGeneration, "qwen3_vl_moe")
for _config_class, _model_class in (
    (MFPrunerQwen3VLConfig, MFPrunerQwen3VLForConditionalGeneration),
    (MFPrunerQwen3VLMoeConfig, MFPrunerQwen3VLMoeForConditionalGeneration),
):
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["MFPrunerQwen3VLForConditionalGeneration", "MFPrunerQwen3VLMoeForConditionalGeneration"]
