"""MFPruner LLaVA-1.5 for vLLM: vLLM's own LLaVA model and processor, subclassed.

  processor: k = resolve_budget(576, budget, ratio) placeholders per image instead of 576; adds
             per image the prompt's non-image token ids and k (part of the mm cache key)
  embed_multimodal: CLIP tower with the select layer's qkv projection hooked ([CLS] query, keys)
             -> projector -> cues -> vote -> the k kept rows of each image, ascending.
"""

from __future__ import annotations

from contextlib import contextmanager

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from mfpruner_core import MFPrunerResult, attention_from_query

from .pruning import (
    KEEP,
    TEXT_IDS,
    KeptPlaceholdersMixin,
    check_supported,
    head_mean,
    image_cues,
    per_item,
    select,
)

class MFPrunerLlavaMultiModalProcessor(KeptPlaceholdersMixin, LlavaMultiModalProcessor):
    def visual_tokens_per_image(self, hf_outputs) -> list[int]:
        return [self.info.get_max_image_tokens()] * len(hf_outputs["pixel_values"])  # 576 for LLaVA-1.5


@contextmanager
def capture_cls_attention(vision_tower):
    """Hooks the qkv projection of the tower's last built layer (vLLM builds the CLIP tower only up
    to the select layer) for one forward pass. Yields a dict that fills with "attention": (I, T)
    the [CLS] attention row over all T tokens, mean over all heads (identical on every TP rank)."""
    attn = vision_tower.vision_model.encoder.layers[-1].self_attn
    captured = {}

    def hook(module, args, output):
        qkv = output[0] if isinstance(output, tuple) else output  # (I, T, 3 * H_local * Dh)
        q, k, _ = qkv.detach().chunk(3, dim=-1)
        images, tokens = k.shape[:2]
        heads = attn.num_heads_per_partition
        q_cls = q[:, 0].reshape(images, heads, attn.head_dim)  # (I, H, Dh)
        keys = k.reshape(images, tokens, heads, attn.head_dim).transpose(1, 2)  # (I, H, T, Dh)
        attention = attention_from_query(q_cls, keys, attn.scale)
        if attn.tp_size > 1:
            attention = head_mean(attention * heads, heads, attn.num_heads, attn.tp_size)
        captured["attention"] = attention

    handle = attn.qkv_proj.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@MULTIMODAL_REGISTRY.register_processor(
    MFPrunerLlavaMultiModalProcessor, info=LlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class MFPrunerLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-1.5 with MFPruner. `last_pruning` holds the last encoder call's decisions (an
    `MFPrunerResult`: kept indices and cue scores per image), as the transformers class does."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        check_supported(vllm_config, "LLaVA-1.5")
        layer = config.vision_feature_layer
        if not isinstance(layer, int) or config.vision_feature_select_strategy != "default":
            raise ValueError(
                "mfpruner_vllm serves LLaVA-1.5 repos with one int `vision_feature_layer` and the 'default' "
                f"feature strategy, got {layer!r} / {config.vision_feature_select_strategy!r}"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.last_pruning: MFPrunerResult | None = None

    def load_weights(self, weights):
        # A repo with a CLIP text tower served with relevance_source='llm': the tower is not used.
        unused = ("clip_text_model.", "clip_visual_projection.")
        return super().load_weights((name, w) for name, w in weights if not name.startswith(unused))

    def embed_multimodal(self, **kwargs):
        text_ids, keep = kwargs.pop(TEXT_IDS, None), kwargs.pop(KEEP, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError("MFPruner needs the images' pixels to prune; `image_embeds` inputs are not supported")
        with capture_cls_attention(self.vision_tower) as captured:
            features = self._image_pixels_to_features(self.vision_tower, image_input["pixel_values"])
        tokens = self.multi_modal_projector(features)  # (I, N, D)
        attention = captured["attention"][:, 1:]  # (I, N): drop the [CLS] column after the softmax
        kept, result = [], MFPrunerResult([], {name: [] for name in self.config.mfpruner_cues}, [], [], 0)
        for i, (ids, k) in enumerate(zip(per_item(text_ids, len(tokens)), per_item(keep, len(tokens)))):
            text_embeds = self.language_model.embed_input_ids(ids.to(tokens.device).view(-1))
            cues = image_cues(self.config, attention[i], tokens[i], text_embeds)
            indices = select(self.config, cues, int(k))
            kept.append(tokens[i][indices])
            result.keep_indices.append(indices.cpu())
            result.num_visual_tokens.append(tokens.shape[1])
            for name, score in cues.items():
                result.cue_scores[name].append(score[0].cpu())
        self.last_pruning = result
        return kept
