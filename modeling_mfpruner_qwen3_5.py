"""MFPruner for Qwen3.5 (Qwen/Qwen3.5-9B, 27B, ...) and Qwen3.5 MoE (Qwen/Qwen3.5-35B-A3B, ...):
images, multi-image prompts, video. The MoE model has the same vision tower and the same hybrid
layers with experts in the MLPs; the two classes share all their MFPruner code.

The vision side is Qwen3-VL's without DeepStack (the same 16 px patches, 2x2 merger, whole-image
attention in every block), so Qwen3-VL's visual encoding serves it unchanged
(`MFPrunerQwen3VLMixin`: cue A from the last vision block, M-RoPE positions gathered at the kept
tokens, the kept tokens handed to the stock forward() as `mm_encoder_outputs`).

What differs is the language model: three of every four layers are Gated DeltaNet layers (linear
attention with a recurrent state and a short causal convolution), the fourth full attention. A
pruned batch is re-padded on the left; the stock linear-attention layers zero the hidden states of
padded positions before their projections (`apply_mask_to_padding_states`), so a left-padded row's
convolution and recurrent state start from zeros, as the same row alone would: each row of a pruned
batch gets the state of that row alone (tests/test_modeling_mfpruner_qwen3_5.py checks it). The
cache of a pruned prefill (KV for the full-attention layers, conv and recurrent states for the
others) is the stock cache; generate() continues from it.

The stock Qwen3.5 config also maps AutoModelForCausalLM (the text-only model), and for the dense model
AutoModelForSequenceClassification and AutoModelForTokenClassification: an MFPruner repo's auto_map
names the classes at the end of this file, which load those stock classes (`StockHeadMixin`).
"""

from __future__ import annotations

from transformers import (
    GenerationMixin,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5ForSequenceClassification,
    Qwen3_5ForTokenClassification,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeForConditionalGeneration,
)
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionAttention
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionAttention

if __package__:  # remote code (transformers_modules.<repo>.<file>): the repo's own sibling files
    from .configuration_mfpruner import MFPrunerQwen3_5Config, MFPrunerQwen3_5MoeConfig
    from .mfpruner_pipeline import MFPrunerPipelineMixin, StockHeadMixin, register_stock_key_layout
    from .modeling_mfpruner_qwen2_5_vl import CueCapturingAttentionMixin
    from .modeling_mfpruner_qwen3_vl import MFPrunerQwen3VLMixin
else:  # a top-level module of a checkout (tests, tools, app.py); see modeling_mfpruner_qwen3_vl.py
    from importlib import import_module

    _configuration = import_module("configuration_mfpruner")
    MFPrunerQwen3_5Config, MFPrunerQwen3_5MoeConfig = _configuration.MFPrunerQwen3_5Config, _configuration.MFPrunerQwen3_5MoeConfig
    _pipeline = import_module("mfpruner_pipeline")
    MFPrunerPipelineMixin, register_stock_key_layout = _pipeline.MFPrunerPipelineMixin, _pipeline.register_stock_key_layout
    StockHeadMixin = _pipeline.StockHeadMixin
    CueCapturingAttentionMixin = import_module("modeling_mfpruner_qwen2_5_vl").CueCapturingAttentionMixin
    MFPrunerQwen3VLMixin = import_module("modeling_mfpruner_qwen3_vl").MFPrunerQwen3VLMixin


class MFPrunerQwen3_5ForCausalLM(StockHeadMixin, Qwen3_5ForCausalLM):
    """AutoModelForCausalLM on a Qwen3.5 MFPruner repo: the stock text-only model (StockHeadMixin)."""

    config_class = MFPrunerQwen3_5Config


class MFPrunerQwen3_5ForSequenceClassification(StockHeadMixin, Qwen3_5ForSequenceClassification):
    """AutoModelForSequenceClassification on a Qwen3.5 MFPruner repo: the stock head (StockHeadMixin)."""

    config_class = MFPrunerQwen3_5Config


class MFPrunerQwen3_5ForTokenClassification(StockHeadMixin, Qwen3_5ForTokenClassification):
    """AutoModelForTokenClassification on a Qwen3.5 MFPruner repo: the stock head (StockHeadMixin)."""

    config_class = MFPrunerQwen3_5Config


class MFPrunerQwen3_5MoeForCausalLM(StockHeadMixin, Qwen3_5MoeForCausalLM):
    """AutoModelForCausalLM on a Qwen3.5 MoE MFPruner repo: the stock text-only model (StockHeadMixin)."""

    config_class = MFPrunerQwen3_5MoeConfig


class CueCapturingQwen3_5VisionAttention(CueCapturingAttentionMixin, Qwen3_5VisionAttention):
    """Qwen3.5's vision attention with cue A capture (same weights, stock forward outside a capture)."""


class MFPrunerQwen3_5ForConditionalGeneration(
    MFPrunerQwen3VLMixin, MFPrunerPipelineMixin, Qwen3_5ForConditionalGeneration, GenerationMixin
):
    """Qwen3.5 with MFPruner (see the module docstring)."""

    config_class = MFPrunerQwen3_5Config
    token_layout = "smart_resize"  # token -> image region: mfpruner_visualize.TOKEN_LAYOUTS (Qwen2.5-VL's, 32 px tokens)
    capturing_attention_class = CueCapturingQwen3_5VisionAttention
    stock_heads = {
        "AutoModelForCausalLM": MFPrunerQwen3_5ForCausalLM,
        "AutoModelForSequenceClassification": MFPrunerQwen3_5ForSequenceClassification,
        "AutoModelForTokenClassification": MFPrunerQwen3_5ForTokenClassification,
    }


class CueCapturingQwen3_5MoeVisionAttention(CueCapturingAttentionMixin, Qwen3_5MoeVisionAttention):
    """Qwen3.5 MoE's vision attention (the same tower as the dense model's) with cue A capture."""


class MFPrunerQwen3_5MoeForConditionalGeneration(
    MFPrunerQwen3VLMixin, MFPrunerPipelineMixin, Qwen3_5MoeForConditionalGeneration, GenerationMixin
):
    """Qwen3.5 MoE with MFPruner: the dense model's code; only the language model's MLPs differ."""

    config_class = MFPrunerQwen3_5MoeConfig
    token_layout = "smart_resize"  # token -> image region: mfpruner_visualize.TOKEN_LAYOUTS (Qwen2.5-VL's, 32 px tokens)
    capturing_attention_class = CueCapturingQwen3_5MoeVisionAttention
    stock_heads = {"AutoModelForCausalLM": MFPrunerQwen3_5MoeForCausalLM}


# Qwen3.5's hub checkpoints use the module layout (`model.visual.*`, `model.language_model.*`): transformers
# has no key renames for `qwen3_5`, so none is registered (the weights load as stored; the test checks it).
# The MoE checkpoints store each expert's projections apart (`mlp.experts.<i>.gate_proj.weight`, ...): the
# stock expert conversion is registered (transformers' `qwen2_moe` one; its `qwen3_5_moe_text` mapping
# would also drop the `language_model` prefix, which is right only for the text-only class).
register_stock_key_layout(MFPrunerQwen3_5MoeForConditionalGeneration, "qwen2_moe")
for _config_class, _model_class in (
    (MFPrunerQwen3_5Config, MFPrunerQwen3_5ForConditionalGeneration),
    (MFPrunerQwen3_5MoeConfig, MFPrunerQwen3_5MoeForConditionalGeneration),
):
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "MFPrunerQwen3_5ForCausalLM",
    "MFPrunerQwen3_5ForConditionalGeneration",
    "MFPrunerQwen3_5ForSequenceClassification",
    "MFPrunerQwen3_5ForTokenClassification",
    "MFPrunerQwen3_5MoeForCausalLM",
    "MFPrunerQwen3_5MoeForConditionalGeneration",
]
