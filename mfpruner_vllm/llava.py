"""MFPruner LLaVA-1.5 and LLaVA-1.6 (LLaVA-NeXT) for vLLM: vLLM's own models and processors, subclassed.

  processor: per image k = resolve_budget(candidates, budget, ratio) kept tokens (LLaVA-1.5: 576
             candidates; NeXT: the base tile's and the unpadded grid's patch tokens of this image
             size) plus, for NeXT, every image-newline token: exactly that many placeholders.
             Adds per image the prompt's non-image token ids and that count (part of the mm cache key).
  embed_multimodal: CLIP tower with the select layer's qkv projection hooked ([CLS] query, keys)
             -> projector (NeXT: tiles packed into the image's token sequence, newlines included)
             -> cues -> vote -> the kept rows of each image, ascending.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from mfpruner_core import MFPrunerResult, attention_from_query, candidate_rows, clip_text_relevance

from .pruning import KEEP, TEXT_IDS, KeptPlaceholdersMixin, check_supported, head_mean, per_item, pop_pixel_input, prune_images, selections_result

# Per-image inputs for repos with a CLIP text tower: the instruction's CLIP token ids and mask,
# (M, T) window-sized segments, as the repo's processor gives the transformers class.
CLIP_IDS, CLIP_MASK = "mfpruner_clip_ids", "mfpruner_clip_mask"


def uses_clip_text(config) -> bool:
    """The repo carries a CLIP text tower and its relevance cue is configured to read it."""
    return config.clip_text_config is not None and "relevance" in config.mfpruner_cues and config.relevance_source != "llm"


class CLIPInstructionInputsMixin:
    """Put before `KeptPlaceholdersMixin`: for a repo whose relevance cue reads the CLIP text tower,
    adds per image the instruction's CLIP segments. The instruction is found as the repo's
    processor finds it in a prompt string (`instructions_for`: the last user turn, placeholders
    removed), from the prompt's non-image token ids decoded; `clip_segments` cuts the CLIP
    tokenizer's ids into the text tower's windows. Derived from the text ids, which are part of
    the multimodal cache key. The subclass names the repo's processor class (`clip_processor_class`:
    vLLM's own processing loads the stock one, without the CLIP tokenizer)."""

    clip_processor_class: str
    per_image_inputs = (TEXT_IDS, KEEP, CLIP_IDS, CLIP_MASK)

    def _call_hf_processor(self, hf_data, hf_kwargs):
        import processing_mfpruner

        outputs = super()._call_hf_processor(hf_data, hf_kwargs)
        if uses_clip_text(self.info.get_hf_config()):
            # the repo's processor (processor_config.json, clip_tokenizer/), loaded once by vLLM's cache
            processor = self.info.ctx.get_hf_processor(getattr(processing_mfpruner, self.clip_processor_class))
            prompt = processor.tokenizer.decode(list(hf_kwargs[TEXT_IDS]))
            token_ids = processor.clip_tokenizer(processor.instructions_for(prompt, None), verbose=False)["input_ids"]
            ids, mask = processing_mfpruner.clip_segments(token_ids, processor.clip_text_window)  # (1, M, T) each
            images = len(outputs[KEEP])
            outputs[CLIP_IDS] = torch.tensor(ids, dtype=torch.long).expand(images, -1, -1).clone()
            outputs[CLIP_MASK] = torch.tensor(mask, dtype=torch.long).expand(images, -1, -1).clone()
        return outputs


class MFPrunerLlavaMultiModalProcessor(CLIPInstructionInputsMixin, KeptPlaceholdersMixin, LlavaMultiModalProcessor):
    clip_processor_class = "MFPrunerLlavaProcessor"

    def visual_tokens_per_image(self, hf_outputs) -> list[tuple[int, int]]:
        return [(self.info.get_max_image_tokens(), 0)] * len(hf_outputs["pixel_values"])  # 576 for LLaVA-1.5


def packed_tile_positions(image_size, config) -> torch.Tensor:
    """LLaVA-NeXT's visual token sequence of one image of `image_size` (height, width): (N,) long,
    for each token in the order the language model sees it, its index into the image's tile
    features flattened as (tile * P + patch), or -1 for an image-newline token. Base tile first,
    then the high-res grid in raster order, unpadded to the image's aspect ratio, each row closed by
    a newline: the packing of vLLM's `_merge_image_patch_embeddings` ('spatial_unpad') and of
    transformers' `pack_image_features`, applied to indices instead of features."""
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size  # patch rows (= cols) per tile
    rows, cols = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, tile)
    index = torch.arange((1 + rows * cols) * side * side).view(1 + rows * cols, side, side)
    grid = index[1:].view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(rows * side, cols * side)
    grid = unpad_image(grid[None], list(image_size))[0]  # (H', W')
    grid = torch.cat([grid, grid.new_full((grid.shape[0], 1), -1)], dim=1)  # the newline closes each row
    return torch.cat([index[0].flatten(), grid.flatten()])


class MFPrunerLlavaNextMultiModalProcessor(CLIPInstructionInputsMixin, KeptPlaceholdersMixin, LlavaNextMultiModalProcessor):
    clip_processor_class = "MFPrunerLlavaNextProcessor"

    def visual_tokens_per_image(self, hf_outputs) -> list[tuple[int, int]]:
        config = self.info.get_hf_config()
        counts = []
        for size in hf_outputs["image_sizes"].tolist():
            is_newline = packed_tile_positions(size, config) < 0
            counts.append((int((~is_newline).sum()), int(is_newline.sum())))
        return counts


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


# Checkpoint names of the CLIP text tower and visual projection (tools/export.py --clip-text).
CLIP_TEXT_WEIGHTS = ("clip_text_model.", "clip_visual_projection.")


class MFPrunerLlavaMixin:
    """What the two LLaVA families share in vLLM: the settings checks, the CLIP text tower (the
    paper's relevance cue) for repos that carry one, and `last_pruning`."""

    family = "LLaVA"

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        check_supported(vllm_config, self.family)
        layer = config.vision_feature_layer
        if not isinstance(layer, int) or config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"mfpruner_vllm serves {self.family} repos with one int `vision_feature_layer` and the 'default' "
                f"feature strategy, got {layer!r} / {config.vision_feature_select_strategy!r}"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if uses_clip_text(config):
            # The transformers class's modules (replicated on every rank: small next to the LLM), and
            # the vision tower's post_layernorm, which vLLM does not build below the last layer.
            from torch import nn
            from transformers import CLIPTextConfig, CLIPTextModelWithProjection

            text_config = CLIPTextConfig(**config.clip_text_config)
            vision = config.vision_config
            self.clip_text_model = CLIPTextModelWithProjection(text_config).eval()
            self.clip_visual_projection = nn.Linear(vision.hidden_size, text_config.projection_dim, bias=False)
            self.clip_post_layernorm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.last_pruning: MFPrunerResult | None = None

    def load_weights(self, weights):
        """The stock weights through vLLM's loader; the CLIP text tower's and the vision tower's
        post_layernorm into the CLIP modules (or dropped when the relevance cue does not read them)."""
        clip_state = {}

        def stock_weights():
            for name, weight in weights:
                if name.startswith(CLIP_TEXT_WEIGHTS):
                    clip_state[name] = weight
                    continue
                if name.startswith("vision_tower.") and ".post_layernorm." in name:
                    clip_state["clip_post_layernorm." + name.rsplit(".", 1)[1]] = weight
                yield name, weight

        loaded = set(super().load_weights(stock_weights()))
        if hasattr(self, "clip_text_model"):
            own = {name: parameter for name, parameter in self.named_parameters() if name.startswith("clip_")}
            missing = sorted(set(own) - set(clip_state))
            if missing:
                raise ValueError(f"mfpruner_vllm: the repo lacks the CLIP text tower weights {missing[:4]}")
            for name, parameter in own.items():
                parameter.data.copy_(clip_state[name])
            loaded |= set(own)
        return loaded

    def clip_relevance(self, select_features, candidates, clip_ids, clip_mask) -> torch.Tensor | None:
        """The paper's cue C over one image's candidates, (n,), as the transformers class computes it:
        select-layer features -> post_layernorm -> visual projection, against the CLIP text tower's
        embedding of each instruction segment. None when the repo's cue does not read the tower.
        select_features: (N, C); candidates: (N,) bool or None; clip_ids / clip_mask: (M, T)."""
        if not hasattr(self, "clip_text_model"):
            return None
        if candidates is not None:
            select_features = candidate_rows(select_features, candidates)
        image = self.clip_visual_projection(self.clip_post_layernorm(select_features))  # (n, E)
        device = image.device
        text = self.clip_text_model(input_ids=clip_ids.to(device), attention_mask=clip_mask.to(device)).text_embeds  # (M, E)
        segments = clip_mask.bool().any(dim=-1).to(device)  # (M,)
        return clip_text_relevance(image[None], text[None].to(image.dtype), segments[None])[0]

    def clip_inputs(self, kwargs: dict, images: int) -> list:
        """Per image (clip ids, clip mask), popped from embed_multimodal's kwargs ((None, None) without them)."""
        ids, mask = kwargs.pop(CLIP_IDS, None), kwargs.pop(CLIP_MASK, None)
        if ids is None:
            return [(None, None)] * images
        return list(zip(per_item(ids, images), per_item(mask, images)))

    def prune(self, images, text_ids, keep) -> list[torch.Tensor]:
        """images: per image (tokens (N, D), raw [CLS] attention (N,), candidates (N,) bool or None,
        CLIP relevance (n,) or None) -> the kept rows of each image; sets `last_pruning`."""
        selections = prune_images(self, images, text_ids, keep)
        self.last_pruning = selections_result(selections, self.config.mfpruner_cues)
        return [s.rows for s in selections]


@MULTIMODAL_REGISTRY.register_processor(
    MFPrunerLlavaMultiModalProcessor, info=LlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class MFPrunerLlavaForConditionalGeneration(MFPrunerLlavaMixin, LlavaForConditionalGeneration):
    """LLaVA-1.5 with MFPruner. `last_pruning` holds the last encoder call's decisions (an
    `MFPrunerResult`: kept indices and cue scores per image), as the transformers class does."""

    family = "LLaVA-1.5"

    def embed_multimodal(self, **kwargs):
        clip_inputs = self.clip_inputs(kwargs, len(kwargs.get("pixel_values", ())))
        image_input, text_ids, keep = pop_pixel_input(self, kwargs)
        if image_input is None:
            return []
        with capture_cls_attention(self.vision_tower) as captured:
            features = self._image_pixels_to_features(self.vision_tower, image_input["pixel_values"])  # (I, N, C)
        tokens = self.multi_modal_projector(features)  # (I, N, D)
        attention = captured["attention"][:, 1:]  # (I, N): drop the [CLS] column after the softmax
        images = [
            (tokens[i], attention[i], None, self.clip_relevance(features[i], None, *clip_inputs[i]))
            for i in range(len(tokens))
        ]
        return self.prune(images, text_ids, keep)


@MULTIMODAL_REGISTRY.register_processor(
    MFPrunerLlavaNextMultiModalProcessor, info=LlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class MFPrunerLlavaNextForConditionalGeneration(MFPrunerLlavaMixin, LlavaNextForConditionalGeneration):
    """LLaVA-1.6 (LLaVA-NeXT, anyres) with MFPruner: the transformers class's selection. Per image,
    the base tile's and the unpadded grid's patch tokens compete for the budget (cue A: each
    tile's [CLS] attention); every image-newline token is kept, outside the budget."""

    family = "LLaVA-NeXT"

    def embed_multimodal(self, **kwargs):
        clip_inputs = self.clip_inputs(kwargs, len(kwargs.get("pixel_values", ())))
        image_input, text_ids, keep = pop_pixel_input(self, kwargs)
        if image_input is None:
            return []
        tiles = list(image_input["pixel_values"])  # per image (tiles, 3, h, w)
        with capture_cls_attention(self.vision_tower) as captured:
            features = self._image_pixels_to_features(self.vision_tower, torch.cat(tiles))  # (all tiles, P, C)
        tile_tokens = self.multi_modal_projector(features)  # (all tiles, P, D)
        tile_attention = captured["attention"][:, 1:]  # (all tiles, P): [CLS] column dropped after the softmax
        counts = [len(t) for t in tiles]
        images = []
        per_image = zip(image_input["image_sizes"], tile_tokens.split(counts), tile_attention.split(counts), features.split(counts), clip_inputs)
        for size, tokens, attention, select_features, (clip_ids, clip_mask) in per_image:
            positions = packed_tile_positions(size.tolist(), self.config).to(tokens.device)  # (N,)
            is_patch, source = positions >= 0, positions.clamp(min=0)  # newlines read patch 0, replaced below
            gathered = tokens.flatten(0, 1)[source]  # (N, D)
            packed = torch.where(is_patch[:, None], gathered, self.image_newline.to(gathered.dtype))
            relevance = self.clip_relevance(select_features.flatten(0, 1)[source], is_patch, clip_ids, clip_mask)
            images.append((packed, attention.flatten()[source], is_patch, relevance))
        return self.prune(images, text_ids, keep)
