"""MFPruner Qwen3.5 and Qwen3.5 MoE for vLLM (images): vLLM's own models, subclassed.

vLLM's Qwen3.5 model is its Qwen3-VL model with a hybrid language model (Gated DeltaNet
linear-attention layers and full-attention layers) and a tower without DeepStack, which is what the
transformers class is too (modeling_mfpruner_qwen3_5.py): the Qwen3-VL plugin's pruning serves it
unchanged (`MFPrunerQwen3VLMixin`: cue A in the last vision block, the kept rows gathered whole (one
merged token each here), the kept tokens at their original interleaved M-RoPE positions, the
processor's per-image inputs). The linear-attention layers' state is vLLM's own per request: the
pruned prompt is just a shorter prompt to it. Videos are refused per request, as for Qwen3-VL.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeProcessingInfo,
    Qwen3_5ProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import Qwen3VLDummyInputsBuilder
from vllm.multimodal import MULTIMODAL_REGISTRY

from .qwen3_vl import ImagesOnlyQwen3VLMixin, MFPrunerQwen3VLMixin, MFPrunerQwen3VLMultiModalProcessor


class MFPrunerQwen3_5ProcessingInfo(ImagesOnlyQwen3VLMixin, Qwen3_5ProcessingInfo):
    family = "Qwen3.5"


class MFPrunerQwen3_5MoeProcessingInfo(ImagesOnlyQwen3VLMixin, Qwen3_5MoeProcessingInfo):
    family = "Qwen3.5 MoE"


@MULTIMODAL_REGISTRY.register_processor(
    MFPrunerQwen3VLMultiModalProcessor, info=MFPrunerQwen3_5ProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class MFPrunerQwen3_5ForConditionalGeneration(MFPrunerQwen3VLMixin, Qwen3_5ForConditionalGeneration):
    """Qwen3.5 with MFPruner (images). `last_pruning` holds the last encoder call's decisions."""

    family = "Qwen3.5"


@MULTIMODAL_REGISTRY.register_processor(
    MFPrunerQwen3VLMultiModalProcessor, info=MFPrunerQwen3_5MoeProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class MFPrunerQwen3_5MoeForConditionalGeneration(MFPrunerQwen3VLMixin, Qwen3_5MoeForConditionalGeneration):
    """Qwen3.5 MoE with MFPruner: the dense model's pruning; only the language model's MLPs differ."""

    family = "Qwen3.5 MoE"
