"""MFPruner for Qwen2.5-VL (Qwen/Qwen2.5-VL-3B/7B/32B/72B-Instruct): images, multi-image prompts, video.

The path, top to bottom:
  pixels -> vision tower (window blocks + full-attention blocks); the last full-attention block's
            attention is a `CueCapturingVisionAttention` (installed once in __init__, the stock
            attention plus, while a capture buffer is active, the attention each patch RECEIVES,
            in query chunks, per attention segment: an image, or one frame pair of a video)
         -> 2x2 patch merger -> visual tokens (raster order) scattered into the prompt embeddings
         -> cues, vote per image / video, splice, language model: mfpruner_pipeline.

M-RoPE: the (t, h, w) position ids of the UNPRUNED prompt are computed first (stock
`get_rope_index`) and gathered at the kept positions, so every kept token, image or text, keeps
its original position; the first generated token gets the unpruned sequence's next position.
Row 0 of the 4-row position ids (text positions, used only for the attention mask) is
renumbered over the pruned sequence. generate() passes these position ids per call (the stock
generate() extends them each step), so nothing is stored on the model; a pruned forward() stores
`model.model.rope_deltas` as the stock forward() does, for manual decoding after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

if __package__:  # remote code (transformers_modules.<repo>.<file>): the repo's own sibling files
    from .configuration_mfpruner import MFPrunerQwen2_5_VLConfig
    from .mfpruner_core import attention_with_received, check_image_tokens, grid_layout, last_full_attention_block
    from .mfpruner_pipeline import (
        EncodedPrompt,
        MFPrunerPipelineMixin,
        VisualItem,
        cue_capture,
        current_cue_capture,
        register_stock_key_layout,
    )
else:  # a top-level module of a checkout (tests, tools, app.py). By module name: transformers' remote-code
    # check would demand that an absolute `from x import y` here name an installed package.
    from importlib import import_module

    _configuration = import_module("configuration_mfpruner")
    MFPrunerQwen2_5_VLConfig = _configuration.MFPrunerQwen2_5_VLConfig
    _core = import_module("mfpruner_core")
    attention_with_received, check_image_tokens = _core.attention_with_received, _core.check_image_tokens
    grid_layout, last_full_attention_block = _core.grid_layout, _core.last_full_attention_block
    _pipeline = import_module("mfpruner_pipeline")
    current_cue_capture, EncodedPrompt = _pipeline.current_cue_capture, _pipeline.EncodedPrompt
    MFPrunerPipelineMixin, VisualItem = _pipeline.MFPrunerPipelineMixin, _pipeline.VisualItem
    cue_capture, register_stock_key_layout = _pipeline.cue_capture, _pipeline.register_stock_key_layout

# ----------------------------------------------------------------------------- helpers of the stock code
# Copied so that the shipped file imports only public transformers API (exported repos keep this
# code; a rename inside transformers must not break them).


# Copied from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.rotate_half (v5.24)
def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


# Copied from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.apply_rotary_pos_emb_vision (v5.24)
def apply_rotary_pos_emb_vision(q, k, cos, sin):
    """Vision rotary embedding: q, k (S, H, Dh); cos, sin (S, Dh)."""
    orig_q_dtype, orig_k_dtype = q.dtype, k.dtype
    q, k = q.float(), k.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed.to(orig_q_dtype), k_embed.to(orig_k_dtype)


# Copied from transformers.vision_utils.get_vision_window_index (v5.24), window index only
def get_vision_window_index(grid_thw, spatial_merge_size: int, window_size: int, patch_size: int) -> torch.Tensor:
    """(total merged tokens,) the order in which the tower's window attention visits the merged
    tokens (raster order -> window order)."""
    window_index, offset = [], 0
    window = window_size // spatial_merge_size // patch_size
    for grid_t, grid_h, grid_w in grid_thw.tolist():
        rows, cols = int(grid_h) // spatial_merge_size, int(grid_w) // spatial_merge_size
        index = torch.arange(int(grid_t) * rows * cols).reshape(int(grid_t), rows, cols)
        pad_h, pad_w = window - rows % window, window - cols % window
        windows_h, windows_w = (rows + pad_h) // window, (cols + pad_w) // window
        padded = F.pad(index, (0, pad_w, 0, pad_h), "constant", -100)
        padded = padded.reshape(int(grid_t), windows_h, window, windows_w, window).permute(0, 1, 3, 2, 4).reshape(-1)
        window_index.append(padded[padded != -100] + offset)
        offset += int(grid_t) * rows * cols
    return torch.cat(window_index, dim=0)


# ----------------------------------------------------------------------------- cue A: attention received


def check_attention_cue_block(block: int | None, cues) -> None:
    """Cue A is read only from a full-attention block: a windowed block's attention stays inside its
    window, so its column sums would rank tokens within windows, not across the image. A tower
    without one prunes with the other cues; asking it for cue A is refused at the pruning call."""
    if block is None and "attention" in cues:
        raise ValueError(
            "`mfpruner_cues` includes 'attention' (cue A), but this vision config has no full-attention block "
            "(`vision_config.fullatt_block_indexes` names none of its blocks): set `mfpruner_cues` without "
            "'attention' (e.g. mfpruner_cues=['uniqueness', 'relevance']), or pass prune_visual_tokens=False"
        )


def attention_and_received_per_patch(attn, hidden_states, cu_seqlens, position_embeddings, query_chunk: int):
    """One vision attention module's forward AND the attention each patch receives, in one pass.

    hidden_states: (S, C) the block's normed input, in the tower's window order; cu_seqlens:
    (G + 1,) segment bounds (one image, or one frame pair of a video); position_embeddings:
    (cos, sin), each (S, Dh). Returns (the module's output (S, C), received (S,) float32): per
    segment, the column sums of softmax(Q K^T * scale) over that segment's queries, mean over
    heads. mfpruner_core.attention_with_received computes the attention once for both, in query
    chunks (CPU) or with fused kernels (CUDA): never heads x S x S.
    """
    length = hidden_states.shape[0]
    q, k, v = attn.qkv(hidden_states).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)  # (S, H, Dh) each
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # (1, H, S, Dh)
    outputs, received = [], []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        out, segment_received = attention_with_received(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], attn.scaling, query_chunk
        )
        outputs.append(out[0].transpose(0, 1))  # (S_seg, H, Dh)
        received.append(segment_received[0])
    return attn.proj(torch.cat(outputs).reshape(length, -1)), torch.cat(received)


class CueCapturingAttentionMixin:
    """Put before a stock Qwen vision attention (qkv, proj, num_heads, scaling; Qwen2.5-VL, Qwen3-VL):
    same parameters, so checkpoints load unchanged. While a capture buffer is active
    (mfpruner_pipeline.cue_capture) it computes its output and the attention each patch receives
    (buffer["received"]) in one pass; otherwise it is exactly the stock forward."""

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        captured = current_cue_capture()
        if captured is None or "query_chunk" not in captured:
            return super().forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        with torch.no_grad():  # THE place cue A is computed
            output, captured["received"] = attention_and_received_per_patch(
                self, hidden_states, cu_seqlens, position_embeddings, captured["query_chunk"]
            )
        return output


class CueCapturingVisionAttention(CueCapturingAttentionMixin, Qwen2_5_VLVisionAttention):
    """Qwen2.5-VL's vision attention with cue A capture (`CueCapturingAttentionMixin`)."""


def install_cue_capture(block, capturing_class) -> None:
    """Replaces `block.attn` by `capturing_class` built on the very same weights."""
    stock = block.attn
    capturing = capturing_class(stock.config)
    capturing.qkv, capturing.proj = stock.qkv, stock.proj
    block.attn = capturing


def merged_raster_scores(received, grid_thw, visual) -> torch.Tensor:
    """(S,) per-patch scores in window order -> (S / merge^2,) per visual token in raster order:
    the mean over each merge group (contiguous in the tower's layout), then argsort(window_index)."""
    unit = visual.spatial_merge_size**2
    window_index = get_vision_window_index(
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


class MFPrunerQwen2_5_VLForConditionalGeneration(
    MFPrunerPipelineMixin, Qwen2_5_VLForConditionalGeneration, GenerationMixin
):
    """Qwen2.5-VL with MFPruner: per image (or video) its merged tokens, cue A from the last
    full-attention vision block, LLM-space relevance; the pipeline does the rest."""

    config_class = MFPrunerQwen2_5_VLConfig
    token_layout = "smart_resize"  # token -> image region: mfpruner_visualize.TOKEN_LAYOUTS
    pixel_input_names = ("pixel_values", "pixel_values_videos")
    visual_input_names = (
        "pixel_values",
        "pixel_values_videos",
        "image_grid_thw",
        "video_grid_thw",
        "second_per_grid_ts",
        "mm_token_type_ids",
    )

    def __init__(self, config: MFPrunerQwen2_5_VLConfig):
        super().__init__(config)
        self.cue_block = last_full_attention_block(self.model.visual)
        if self.cue_block is None:
            return  # no cue A here; the other cues and pruning off work as usual (check_attention_cue_block)
        install_cue_capture(self.model.visual.blocks[self.cue_block], CueCapturingVisionAttention)

    # -- visual encoding --------------------------------------------------------------------

    def visual_features_with_attention(self, pixels, grid_thw, kind: str, capture_attention: bool = True):
        """Runs the vision tower once on all images (or all videos). Returns (per item a list of
        (N_i, D) visual tokens and a list of (N_i,) attention received, raster order (None when not
        captured), the stock vision output)."""
        settings = {"query_chunk": self.config.attention_query_chunk} if capture_attention else {}
        with cue_capture(**settings) as captured:
            if kind == "image":
                output = self.model.get_image_features(pixel_values=pixels, image_grid_thw=grid_thw)
            else:
                output = self.model.get_video_features(pixel_values_videos=pixels, video_grid_thw=grid_thw)
        sizes = [len(features) for features in output.pooler_output]
        if "received" not in captured:
            return list(output.pooler_output), [None] * len(sizes), output
        attention = self.merged_attention(captured["received"], grid_thw.to(captured["received"].device))
        return list(output.pooler_output), list(attention.split(sizes)), output

    def merged_attention(self, received, grid_thw) -> torch.Tensor:
        """(S,) attention received per patch, in the tower's order -> (S / 4,) per visual token, raster order."""
        return merged_raster_scores(received, grid_thw, self.model.visual)

    def place_visual_tokens(self, inputs_embeds, is_kind, features, token_id: int):
        """The prompt embeddings with the visual tokens of one kind scattered at `is_kind` (B, L)."""
        scattered = torch.cat(features).to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(is_kind.to(inputs_embeds.device)[..., None], scattered)

    def encode_visual(self, input_ids, inputs_embeds, attention_mask, visual: dict, cues: list[str]) -> EncodedPrompt:
        """Images then videos through the tower (cue A captured when configured), scattered into
        the prompt embeddings; the unpruned M-RoPE positions (3, B, L)."""
        check_attention_cue_block(self.cue_block, cues)
        merge = self.config.vision_config.spatial_merge_size
        image_id, video_id = self.config.image_token_id, self.config.video_token_id
        is_image, is_video = input_ids == image_id, input_ids == video_id
        items, vision_outputs = [], {}
        for kind, pixels_name, token_id in (
            ("image", "pixel_values", image_id),
            ("video", "pixel_values_videos", video_id),
        ):
            pixels, grid = visual[pixels_name], visual[f"{kind}_grid_thw"]
            if pixels is None:
                continue
            tokens = check_grid(pixels, grid, merge, pixels_name, f"{kind}_grid_thw")
            rows = check_image_tokens(input_ids, token_id, len(tokens), tokens, name=kind, pixels=pixels_name)
            features, attention, output = self.visual_features_with_attention(pixels, grid, kind, "attention" in cues)
            inputs_embeds = self.place_visual_tokens(inputs_embeds, input_ids == token_id, features, token_id)
            vision_outputs[f"{kind}_outputs"] = output
            for f, a, row, item_grid in zip(features, attention, rows, token_grids(grid, merge)):
                items.append(
                    VisualItem(
                        kind=kind,
                        token_id=token_id,
                        row=row,
                        tokens=f,
                        attention=a,
                        select_features=None,
                        candidates=torch.ones(len(f), dtype=torch.bool, device=f.device),
                        grid=item_grid,
                        base_grid=item_grid,
                        layout=grid_layout(*item_grid, device=f.device),
                    )
                )

        mm_token_type_ids = visual["mm_token_type_ids"]
        if mm_token_type_ids is None:
            mm_token_type_ids = is_image.int() + 2 * is_video.int()
        positions, _ = self.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=visual["image_grid_thw"] if visual["pixel_values"] is not None else None,
            video_grid_thw=visual["video_grid_thw"] if visual["pixel_values_videos"] is not None else None,
            second_per_grid_ts=visual.get("second_per_grid_ts"),  # Qwen3-VL has none (timestamps are text)
            attention_mask=attention_mask,
        )  # (3, B, L): every token's (t, h, w) position in the UNPRUNED prompt
        return EncodedPrompt(inputs_embeds=inputs_embeds, items=items, positions=positions, vision_outputs=vision_outputs)

    def pruned_position_ids(self, positions, attention_mask):
        """(3, B, L') gathered M-RoPE positions -> (4, B, L'): text positions renumbered over the
        pruned sequence (as the stock generate() numbers them) on top."""
        text_positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        return torch.cat([text_positions[None].to(positions.device), positions], dim=0)

    def rope_deltas(self, position_ids, attention_mask):
        """(B, 1) next M-RoPE position - real length of each row (what the stock model adds to a
        running count to continue)."""
        mrope = position_ids[-3:]
        mask = attention_mask.to(mrope.device)
        real_max = mrope.masked_fill(mask[None] == 0, 0).amax(dim=(0, 2))  # (B,)
        return (real_max + 1 - mask.sum(dim=-1))[:, None]

    def remember_prefill(self, position_ids, attention_mask) -> None:
        """As the stock forward(): stores rope_deltas on the model (manual decoding reads it)."""
        self.model.rope_deltas = self.rope_deltas(position_ids, attention_mask)

    def continuation_position_ids(self, attention_mask, rope_deltas):
        """(4, B, L): the running text count, and count + rope_deltas in the three M-RoPE rows."""
        text_positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        mrope = text_positions[None].expand(3, -1, -1) + rope_deltas.to(text_positions.device)[None]
        return torch.cat([text_positions[None], mrope], dim=0)


register_stock_key_layout(MFPrunerQwen2_5_VLForConditionalGeneration, "Qwen2_5_VLForConditionalGeneration")
MFPrunerQwen2_5_VLConfig.register_for_auto_class()
MFPrunerQwen2_5_VLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["MFPrunerQwen2_5_VLForConditionalGeneration"]
