"""MFPruner Qwen3-VL and Qwen3-VL MoE for vLLM (images): vLLM's own models and processors, subclassed.

The Qwen2.5-VL plugin's path (mfpruner_vllm.qwen2_5_vl), reused by import; what differs:
  cue A: the LAST vision block's attention kernel is swapped (Qwen3-VL's tower has no window
         attention: every block attends over a whole image), and its patches are never reordered,
         so a token's score is the mean over its contiguous 2x2 merge group
  DeepStack: vLLM's tower returns each visual token's row as the merged token followed by its
         DeepStack levels, (N, D * (1 + levels)); the cues read the merged token, and the kept rows
         are gathered whole, so every level keeps exactly the same tokens; vLLM's stock
         embed_input_ids then splits them and adds the levels at the kept positions
  processor: vLLM's Qwen3-VL processor calls the HF processor itself (`_apply_hf_processor_main`,
         not `_call_hf_processor`), so the per-image inputs are added there
M-RoPE positions (interleaved frequencies, the same (t, h, w) positions as Qwen2.5-VL), the
selection cache and embed_multimodal are Qwen2.5-VL's methods. Videos are refused per request.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY

from .pruning import KEEP, TEXT_IDS, ImagesOnlyMixin, KeptPlaceholdersMixin, without_plugin_kwargs
from .qwen2_5_vl import (
    IMAGE_KEY,
    MFPrunerQwen2_5_VLForConditionalGeneration,
    MFPrunerQwen2_5_VLMultiModalProcessor,
    add_item_keys,
    check_qwen_supported,
    init_qwen_pruning,
)


class ImagesOnlyQwen3VLMixin(ImagesOnlyMixin):
    def get_supported_mm_processor_kwargs(self):
        # vLLM's Qwen3-VL info adds two names to the videos' kwargs scope, which vLLM builds only for a
        # served modality: with images only, the scopes are the base class's.
        return super(Qwen3VLProcessingInfo, self).get_supported_mm_processor_kwargs()


class MFPrunerQwen3VLProcessingInfo(ImagesOnlyQwen3VLMixin, Qwen3VLProcessingInfo):
    family = "Qwen3-VL"


class MFPrunerQwen3VLMoeProcessingInfo(ImagesOnlyQwen3VLMixin, Qwen3VLMoeProcessingInfo):
    family = "Qwen3-VL MoE"


class MFPrunerQwen3VLMultiModalProcessor(KeptPlaceholdersMixin, Qwen3VLMultiModalProcessor):
    per_image_inputs = (TEXT_IDS, KEEP, IMAGE_KEY)
    visual_tokens_per_image = MFPrunerQwen2_5_VLMultiModalProcessor.visual_tokens_per_image
    grid_tokens = MFPrunerQwen2_5_VLMultiModalProcessor.grid_tokens

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        outputs = super()._apply_hf_processor_main(mm_items, without_plugin_kwargs(hf_kwargs))
        if "image_grid_thw" not in outputs:  # no image to process (text only, or all cached)
            return outputs
        return add_item_keys(self.add_per_item_inputs(outputs, hf_kwargs, ["image"]))


class MFPrunerQwen3VLMixin:
    """Qwen3-VL's pruning (dense and MoE share it); a class sets `family`."""

    family = "Qwen3-VL"

    def __init__(self, *, vllm_config, prefix: str = "model"):
        check_qwen_supported(vllm_config, self.family)
        if vllm_config.model_config.get_multimodal_config().is_multimodal_pruning_enabled():
            # vLLM's own video pruning (EVS) makes the GPU runner move positions after the encoder,
            # reading them from extra channels of embed_multimodal's rows, which these rows do not have.
            raise ValueError(f"mfpruner_vllm: video_pruning_rate is not supported for {self.family}; leave it unset")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # Every block attends over a whole image (no windows): the last one is cue A's full-attention block.
        init_qwen_pruning(self, vllm_config, len(self.visual.blocks) - 1, self.family)

    select_images = MFPrunerQwen2_5_VLForConditionalGeneration.select_images
    cached_selections = MFPrunerQwen2_5_VLForConditionalGeneration.cached_selections
    embed_multimodal = MFPrunerQwen2_5_VLForConditionalGeneration.embed_multimodal
    get_mrope_input_positions = MFPrunerQwen2_5_VLForConditionalGeneration.get_mrope_input_positions

    def merged_attention(self, received, grids):
        """(S,) attention received per patch -> (S / 4,) per visual token: the mean over each merge
        group (contiguous in the processor's patch layout; Qwen3-VL's tower never reorders patches)."""
        return received.view(-1, self.visual.spatial_merge_unit).mean(dim=-1)


@MULTIMODAL_REGISTRY.register_processor(
    MFPrunerQwen3VLMultiModalProcessor, info=MFPrunerQwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class MFPrunerQwen3VLForConditionalGeneration(MFPrunerQwen3VLMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL with MFPruner (images). `last_pruning` holds the last encoder call's decisions."""


@MULTIMODAL_REGISTRY.register_processor(
    MFPrunerQwen3VLMultiModalProcessor, info=MFPrunerQwen3VLMoeProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class MFPrunerQwen3VLMoeForConditionalGeneration(MFPrunerQwen3VLMixin, Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL MoE with MFPruner: the dense model's pruning; only the language model differs."""

    family = "Qwen3-VL MoE"
