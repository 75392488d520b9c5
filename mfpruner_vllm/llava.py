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

from mfpruner_core import MFPrunerResult, attention_from_query

from .pruning import KeptPlaceholdersMixin, check_supported, head_mean, pop_pixel_input, prune_images


class MFPrunerLlavaMultiModalProcessor(KeptPlaceholdersMixin, LlavaMultiModalProcessor):
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


class MFPrunerLlavaNextMultiModalProcessor(KeptPlaceholdersMixin, LlavaNextMultiModalProcessor):
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


class MFPrunerLlavaMixin:
    """What the two LLaVA families share in vLLM: the settings checks, the unused CLIP text tower's
    weights, and `last_pruning`."""

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
        self.last_pruning: MFPrunerResult | None = None

    def load_weights(self, weights):
        # A repo with a CLIP text tower served with relevance_source='llm': the tower is not used.
        unused = ("clip_text_model.", "clip_visual_projection.")
        return super().load_weights((name, w) for name, w in weights if not name.startswith(unused))

    def prune(self, images, text_ids, keep) -> list[torch.Tensor]:
        """images: per image (tokens (N, D), raw [CLS] attention (N,), candidates (N,) bool or None)
        -> the kept rows of each image; sets `last_pruning`."""
        kept, self.last_pruning = prune_images(self, images, text_ids, keep)
        return kept


@MULTIMODAL_REGISTRY.register_processor(
    MFPrunerLlavaMultiModalProcessor, info=LlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class MFPrunerLlavaForConditionalGeneration(MFPrunerLlavaMixin, LlavaForConditionalGeneration):
    """LLaVA-1.5 with MFPruner. `last_pruning` holds the last encoder call's decisions (an
    `MFPrunerResult`: kept indices and cue scores per image), as the transformers class does."""

    family = "LLaVA-1.5"

    def embed_multimodal(self, **kwargs):
        image_input, text_ids, keep = pop_pixel_input(self, kwargs)
        if image_input is None:
            return []
        with capture_cls_attention(self.vision_tower) as captured:
            features = self._image_pixels_to_features(self.vision_tower, image_input["pixel_values"])
        tokens = self.multi_modal_projector(features)  # (I, N, D)
        attention = captured["attention"][:, 1:]  # (I, N): drop the [CLS] column after the softmax
        return self.prune([(tokens[i], attention[i], None) for i in range(len(tokens))], text_ids, keep)


@MULTIMODAL_REGISTRY.register_processor(
    MFPrunerLlavaNextMultiModalProcessor, info=LlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class MFPrunerLlavaNextForConditionalGeneration(MFPrunerLlavaMixin, LlavaNextForConditionalGeneration):
    """LLaVA-1.6 (LLaVA-NeXT, anyres) with MFPruner: the transformers class's selection. Per image,
    the base tile's and the unpadded grid's patch tokens compete for the budget (cue A: each
    tile's [CLS] attention); every image-newline token is kept, outside the budget."""

    family = "LLaVA-NeXT"

    def embed_multimodal(self, **kwargs):
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
        for size, tokens, attention in zip(image_input["image_sizes"], tile_tokens.split(counts), tile_attention.split(counts)):
            positions = packed_tile_positions(size.tolist(), self.config).to(tokens.device)  # (N,)
            is_patch, source = positions >= 0, positions.clamp(min=0)  # newlines read patch 0, replaced below
            gathered = tokens.flatten(0, 1)[source]  # (N, D)
            packed = torch.where(is_patch[:, None], gathered, self.image_newline.to(gathered.dtype))
            images.append((packed, attention.flatten()[source], is_patch))
        return self.prune(images, text_ids, keep)
