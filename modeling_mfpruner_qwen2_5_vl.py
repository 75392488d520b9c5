"""MFPruner for Qwen2.5-VL (Qwen/Qwen2.5-VL-3B/7B/32B/72B-Instruct): images, multi-image prompts, video.

The path, top to bottom:
  pixels -> vision tower (window blocks + full-attention blocks), with a pre-hook on the last
            full-attention block that accumulates the attention each patch RECEIVES, in query
            chunks, per attention segment (an image, or one frame pair of a video)
         -> 2x2 patch merger -> visual tokens (raster order) scattered into the prompt embeddings
         -> cues (attention, uniqueness, LLM-space relevance) -> vote (mfpruner_core) per image /
            per video under its own budget -> keep mask
         -> drop pruned visual positions (embeddings, mask, labels, M-RoPE positions), re-pad
         -> language model.

M-RoPE: the (t, h, w) position ids of the UNPRUNED prompt are computed first (stock
`get_rope_index`) and gathered at the kept positions, so every kept token, image or text, keeps
its original position; the first generated token gets the unpruned sequence's next position.
Row 0 of the 4-row position ids (text positions, used only for the attention mask) is
renumbered over the pruned sequence. `model.model.rope_deltas` is set to
`max_position + 1 - pruned_length` per row, what the stock model would use to continue.

`generate()` prunes once and runs the stock `generate()` on the kept embeddings, so the prefill
and the KV cache are truly shorter; it returns the original prompt followed by the new tokens.
`forward(pixel_values=...)` prunes the same way (logits have the pruned length; `labels` are
pruned with the tokens). After a pruning call `model.last_pruning` is an `MFPrunerResult`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

try:
    from .configuration_mfpruner import MFPrunerQwen2_5_VLConfig, validate_mfpruner_settings
    from .mfpruner_core import (
        MFPrunerResult,
        attention_received,
        auto_map_with_auto_model,
        call_budget,
        call_min_votes,
        check_image_tokens,
        compact_rows,
        keep_mask_for_images,
        llm_relevance,
        min_max_normalize,
        resolve_budget,
        restore_prompt,
        select_tokens,
        uniqueness,
    )
except ImportError:  # imported as a top-level module (tests, tools)
    from configuration_mfpruner import MFPrunerQwen2_5_VLConfig, validate_mfpruner_settings
    from mfpruner_core import (
        MFPrunerResult,
        attention_received,
        auto_map_with_auto_model,
        call_budget,
        call_min_votes,
        check_image_tokens,
        compact_rows,
        keep_mask_for_images,
        llm_relevance,
        min_max_normalize,
        resolve_budget,
        restore_prompt,
        select_tokens,
        uniqueness,
    )

PRUNING_KWARGS = ("visual_token_budget", "visual_token_ratio", "prune_visual_tokens", "min_votes")
VISION_KWARGS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids")


# ----------------------------------------------------------------------------- cue A: attention received


def last_full_attention_block(visual) -> int:
    """Index of the last full-attention (not windowed) vision block, where cue A is read."""
    full = [i for i in visual.fullatt_block_indexes if i < len(visual.blocks)]
    if not full:
        raise ValueError("the vision config has no full-attention block (`fullatt_block_indexes`); cue A needs one")
    return max(full)


def received_attention_per_patch(attn, hidden_states, cu_seqlens, position_embeddings, query_chunk: int):
    """Attention each patch receives in one vision attention module, per attention segment.

    hidden_states: (S, C) the block's normed input, in the tower's window order; cu_seqlens:
    (G + 1,) segment bounds (one image, or one frame pair of a video); position_embeddings:
    (cos, sin), each (S, Dh). Returns (S,) float32: per segment, the column sums of
    softmax(Q K^T * scale) over that segment's queries, mean over heads. Chunked over queries
    (mfpruner_core.attention_received): never heads x S x S.
    """
    length = hidden_states.shape[0]
    q, k, _ = attn.qkv(hidden_states).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)  # (S, H, Dh) each
    received = torch.empty(length, dtype=torch.float32, device=hidden_states.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        received[start:end] = attention_received(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), attn.scaling, query_chunk
        )
    return received


@contextmanager
def capture_received_attention(visual, query_chunk: int):
    """Pre-hook on the last full-attention block's attention for one vision forward pass.

    Yields a dict that fills with "received": (S,) attention received per patch, window order."""
    attn = visual.blocks[last_full_attention_block(visual)].attn
    captured = {}

    def hook(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            captured["received"] = received_attention_per_patch(
                module, hidden_states.detach(), kwargs["cu_seqlens"], kwargs["position_embeddings"], query_chunk
            )

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def merged_raster_scores(received, grid_thw, visual) -> torch.Tensor:
    """(S,) per-patch scores in window order -> (S / merge^2,) per visual token in raster order:
    the mean over each merge group (contiguous in the tower's layout), then argsort(window_index)."""
    unit = visual.spatial_merge_size**2
    window_index, _ = get_vision_window_index(
        grid_thw,
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
    )
    return received.view(-1, unit).mean(dim=-1)[torch.argsort(window_index.to(received.device))]


# ----------------------------------------------------------------------------- input checks


def check_grid(pixels, grid_thw, merge_size: int, pixels_name: str, grid_name: str) -> list[int]:
    """The grid must describe the pixel rows; returns the visual tokens of each image / video."""
    if grid_thw is None:
        raise ValueError(f"`{pixels_name}` need `{grid_name}` ((num, 3) temporal, height, width patches), got None")
    if grid_thw.ndim != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"`{grid_name}` must be (num, 3) (temporal, height, width), got shape {tuple(grid_thw.shape)}")
    patches = int(grid_thw.prod(dim=-1).sum())
    if patches != pixels.shape[0]:
        raise ValueError(
            f"`{grid_name}` describes {patches} patches but `{pixels_name}` holds {pixels.shape[0]} rows; "
            "pass the grid the processor returned with these pixels"
        )
    if bool((grid_thw[:, 1:] % merge_size != 0).any()):
        raise ValueError(f"`{grid_name}` heights and widths must be multiples of spatial_merge_size={merge_size}")
    return (grid_thw.prod(dim=-1) // merge_size**2).tolist()


def token_grids(grid_thw, merge_size: int) -> list[tuple[int, int]]:
    """(rows, cols) of each item's token map; a video's frames are stacked top to bottom."""
    return [(t * h // merge_size, w // merge_size) for t, h, w in grid_thw.tolist()]


# ----------------------------------------------------------------------------- model


class MFPrunerQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    config_class = MFPrunerQwen2_5_VLConfig

    def __init__(self, config: MFPrunerQwen2_5_VLConfig):
        super().__init__(config)
        self.last_pruning: MFPrunerResult | None = None

    # -- cues -------------------------------------------------------------------------------

    def visual_features_with_attention(self, pixels, grid_thw, kind: str):
        """Runs the vision tower once on all images (or all videos). Returns per item a list of
        (N_i, D) visual tokens and a list of (N_i,) attention received, raster order (None
        when the attention cue is not configured: then no hook runs)."""
        visual = self.model.visual
        if "attention" in self.config.mfpruner_cues:
            capture = capture_received_attention(visual, self.config.attention_query_chunk)
        else:
            capture = nullcontext({})
        with capture as captured:
            if kind == "image":
                output = self.model.get_image_features(pixel_values=pixels, image_grid_thw=grid_thw)
            else:
                output = self.model.get_video_features(pixel_values_videos=pixels, video_grid_thw=grid_thw)
        sizes = [len(features) for features in output.pooler_output]
        if "received" not in captured:
            return list(output.pooler_output), [None] * len(sizes)
        attention = merged_raster_scores(captured["received"], grid_thw, visual).split(sizes)
        return list(output.pooler_output), list(attention)

    def cue_scores(self, visual_tokens, attention, inputs_embeds, text_mask, row: int) -> dict:
        """The configured cues of one image / video: (N, D) tokens -> {name: (1, N)}."""
        cues = {}
        for name in self.config.mfpruner_cues:
            if name == "attention":
                cues[name] = min_max_normalize(attention[None])
            elif name == "uniqueness":
                cues[name] = uniqueness(visual_tokens[None])
            else:
                cues[name] = llm_relevance(visual_tokens[None], inputs_embeds[row][None], text_mask[row][None])
        return cues

    # -- pruning ----------------------------------------------------------------------------

    def prune_inputs(
        self,
        input_ids,
        pixel_values=None,
        pixel_values_videos=None,
        attention_mask=None,
        labels=None,
        image_grid_thw=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        mm_token_type_ids=None,
        visual_token_budget=None,
        visual_token_ratio=None,
        left_pad: bool | None = None,
        min_votes: int | None = None,
    ) -> dict:
        """Encodes images and videos, votes per item, and returns the pruned language-model
        inputs: input_ids, inputs_embeds, attention_mask, position_ids (4, B, L') (and labels).
        The budget and `min_votes` arguments override the config's for this call."""
        validate_mfpruner_settings(self.config)  # the config may have been edited since loading
        budget, ratio = call_budget(
            self.config.visual_token_budget, self.config.visual_token_ratio, visual_token_budget, visual_token_ratio
        )
        min_votes = call_min_votes(self.config.min_votes, min_votes)
        encoded = self.encode_prompt(
            input_ids,
            pixel_values,
            pixel_values_videos,
            attention_mask,
            image_grid_thw,
            video_grid_thw,
            second_per_grid_ts,
            mm_token_type_ids,
        )
        return self.select_and_compact(encoded, budget, ratio, min_votes, labels=labels, left_pad=left_pad)

    def encode_prompt(
        self,
        input_ids,
        pixel_values=None,
        pixel_values_videos=None,
        attention_mask=None,
        image_grid_thw=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        mm_token_type_ids=None,
    ) -> dict:
        """Everything before the vote: the vision tower (with cue A) on all images and videos,
        their tokens scattered into the prompt embeddings, the unpruned M-RoPE positions.

        Returns input_ids, attention_mask (B, L); inputs_embeds (B, L, D); positions (3, B, L);
        items: per image then per video (kind, (N, D) tokens, (N,) attention, batch row, grid)."""
        if input_ids is None:
            raise ValueError("MFPruner needs `input_ids` (not only `inputs_embeds`) to locate the image / video tokens")
        merge = self.config.vision_config.spatial_merge_size
        image_id, video_id = self.config.image_token_id, self.config.video_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        is_image, is_video = input_ids == image_id, input_ids == video_id

        inputs_embeds = self.get_input_embeddings()(input_ids)
        items = []
        for kind, pixels, grid, is_kind, token_id in (
            ("image", pixel_values, image_grid_thw, is_image, image_id),
            ("video", pixel_values_videos, video_grid_thw, is_video, video_id),
        ):
            if pixels is None:
                continue
            pixels_name = "pixel_values" if kind == "image" else "pixel_values_videos"
            tokens = check_grid(pixels, grid, merge, pixels_name, f"{kind}_grid_thw")
            rows = check_image_tokens(input_ids, token_id, len(tokens), tokens, name=kind, pixels=pixels_name)
            features, attention = self.visual_features_with_attention(pixels, grid, kind)
            scattered = torch.cat(features).to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(is_kind[..., None], scattered)
            items += [(kind, f, a, r, g) for f, a, r, g in zip(features, attention, rows, token_grids(grid, merge))]
        if not items:
            raise ValueError("MFPruner needs `pixel_values` or `pixel_values_videos` to prune")

        if mm_token_type_ids is None:
            mm_token_type_ids = is_image.int() + 2 * is_video.int()
        positions, _ = self.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw if pixel_values is not None else None,
            video_grid_thw=video_grid_thw if pixel_values_videos is not None else None,
            second_per_grid_ts=second_per_grid_ts,
            attention_mask=attention_mask,
        )  # (3, B, L): every token's (t, h, w) position in the UNPRUNED prompt
        return dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            positions=positions,
            items=items,
        )

    def select_and_compact(
        self, encoded: dict, budget, ratio, min_votes: int | None = None, labels=None, left_pad: bool | None = None
    ) -> dict:
        """The vote per image / video under its own budget, then the kept positions of every
        per-token input, re-padded; sets `rope_deltas` and `last_pruning`."""
        min_votes = call_min_votes(self.config.min_votes, min_votes)
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        inputs_embeds, items = encoded["inputs_embeds"], encoded["items"]
        is_image, is_video = input_ids == self.config.image_token_id, input_ids == self.config.video_token_id
        with torch.no_grad():
            text_mask = attention_mask.bool() & ~is_image & ~is_video
            keep_indices, cue_scores = [], {name: [] for name in self.config.mfpruner_cues}
            for kind, features, attention, row, _ in items:
                cues = self.cue_scores(features, attention, inputs_embeds, text_mask, row)
                k = resolve_budget(len(features), budget, ratio)
                keep_indices.append(select_tokens(cues, k, min(min_votes, len(cues)), self.config.fill_by)[0])
                for name, score in cues.items():
                    cue_scores[name].append(score[0].cpu())

        keep = ~(is_image | is_video)
        for kind, is_kind in (("image", is_image), ("video", is_video)):
            chosen = [(idx, len(item[1])) for idx, item in zip(keep_indices, items) if item[0] == kind]
            if chosen:
                keep = keep_mask_for_images(is_kind, [i for i, _ in chosen], [n for _, n in chosen], keep=keep)

        if left_pad is None:  # keep the caller's padding side
            left_pad = not bool((attention_mask[:, -1] == 0).any())
        pad_id = self.config.text_config.pad_token_id
        tensors = {
            "input_ids": input_ids,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "mrope": encoded["positions"].permute(1, 2, 0),  # (B, L, 3)
        }
        pads = {"input_ids": pad_id if pad_id is not None else 0, "inputs_embeds": 0.0, "attention_mask": 0, "mrope": 0}
        if labels is not None:
            tensors["labels"], pads["labels"] = labels, -100
        pruned, _ = compact_rows(keep, tensors, pads, left=left_pad)

        mask = pruned["attention_mask"]
        text_positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as stock generate numbers them
        mrope = pruned.pop("mrope").permute(2, 0, 1)  # (3, B, L')
        pruned["position_ids"] = torch.cat([text_positions[None], mrope], dim=0)  # (4, B, L')
        # What the stock model would store to continue decoding: next position - real length.
        real_max = mrope.masked_fill(mask[None] == 0, 0).amax(dim=(0, 2))  # (B,)
        self.model.rope_deltas = (real_max + 1 - mask.sum(dim=-1))[:, None]

        self.last_pruning = MFPrunerResult(
            keep_indices=[idx.cpu() for idx in keep_indices],
            cue_scores=cue_scores,
            num_visual_tokens=[len(item[1]) for item in items],
            image_to_row=[item[3] for item in items],
            lm_input_length=pruned["input_ids"].shape[1],
            grids=[item[4] for item in items],
            kinds=[item[0] for item in items],
        )
        return pruned

    # -- entry points -----------------------------------------------------------------------

    def save_pretrained(self, *args, **kwargs):
        self.config.auto_map = auto_map_with_auto_model(getattr(self.config, "auto_map", None), self)
        return super().save_pretrained(*args, **kwargs)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        pixel_values=None,
        pixel_values_videos=None,
        image_grid_thw=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        second_per_grid_ts=None,
        visual_token_budget=None,
        visual_token_ratio=None,
        prune_visual_tokens=None,
        min_votes=None,
        **kwargs,
    ):
        """Stock forward; with pixel inputs the visual tokens are pruned first (logits and the loss
        then cover the pruned sequence; `labels` are pruned with it). The pruning arguments are
        listed so that generate() accepts them per call."""
        prune = self.config.prune_visual_tokens if prune_visual_tokens is None else prune_visual_tokens
        vision = dict(
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            second_per_grid_ts=second_per_grid_ts,
        )
        if (pixel_values is None and pixel_values_videos is None) or not prune:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos,
                **vision,
                **kwargs,
            )
        if inputs_embeds is not None:
            raise ValueError(
                "pass `input_ids`, not `inputs_embeds`, with pixel inputs: MFPruner locates visual tokens by id"
            )
        # position_ids are replaced by the gathered M-RoPE positions of the kept tokens
        pruned = self.prune_inputs(
            input_ids,
            pixel_values,
            pixel_values_videos,
            attention_mask=attention_mask,
            labels=labels,
            visual_token_budget=visual_token_budget,
            visual_token_ratio=visual_token_ratio,
            min_votes=min_votes,
            **vision,
        )
        pruned.pop("input_ids")
        return super().forward(**pruned, cache=cache, use_cache=use_cache, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, pixel_values_videos=None, attention_mask=None, **kwargs):
        """Stock generate on the pruned prompt. Returns the original (unpruned) prompt followed by
        the new tokens, as the stock model does, so `out[:, input_ids.shape[1]:]` is the answer."""
        settings = {key: kwargs.pop(key, None) for key in PRUNING_KWARGS}
        prune = settings["prune_visual_tokens"]
        prune = self.config.prune_visual_tokens if prune is None else prune
        if (pixel_values is None and pixel_values_videos is None) or not prune:  # the stock path
            return super().generate(
                input_ids=input_ids,
                pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos,
                attention_mask=attention_mask,
                prune_visual_tokens=False,
                **kwargs,
            )
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError(
                "pass `input_ids`, not `inputs_embeds`, with pixel inputs: MFPruner locates visual tokens by id"
            )
        vision = {key: kwargs.pop(key, None) for key in VISION_KWARGS}
        pruned = self.prune_inputs(
            input_ids,
            pixel_values,
            pixel_values_videos,
            attention_mask=attention_mask,
            visual_token_budget=settings["visual_token_budget"],
            visual_token_ratio=settings["visual_token_ratio"],
            min_votes=settings["min_votes"],
            left_pad=True,
            **vision,
        )
        output = super().generate(**pruned, **kwargs)
        return restore_prompt(output, input_ids, pruned["input_ids"].shape[1])


# Hub checkpoints use the old key layout (`visual.*`, `model.layers.*`); without this mapping the
# weights of a custom class silently load as random (see TRANSFORMERS_NOTES.md).
register_checkpoint_conversion_mapping(
    MFPrunerQwen2_5_VLForConditionalGeneration.__name__,
    get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration"),
    overwrite=True,
)
MFPrunerQwen2_5_VLConfig.register_for_auto_class()
MFPrunerQwen2_5_VLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["MFPrunerQwen2_5_VLForConditionalGeneration"]
