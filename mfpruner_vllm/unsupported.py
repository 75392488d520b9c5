"""MFPruner families the vLLM plugin does not serve yet: registered so that loading one fails at
once with a message saying what is supported (instead of vLLM's "unknown architecture")."""

from __future__ import annotations

from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration


class MFPrunerLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    def __init__(self, *, vllm_config=None, prefix: str = ""):
        raise ValueError(
            "mfpruner_vllm does not serve LLaVA-1.6 / LLaVA-NeXT repos yet (anyres tiles and newline tokens); "
            "supported: MFPrunerLlavaForConditionalGeneration (LLaVA-1.5) and "
            "MFPrunerQwen2_5_VLForConditionalGeneration (Qwen2.5-VL). Use the transformers class for LLaVA-NeXT"
        )
