"""What a pruning call kept, drawn over the image: the drawing API every MFPruner repo ships.

    out = model.generate(**inputs, max_new_tokens=16)
    model.draw_pruning(image, processor=processor)             # PIL.Image: pruned regions dimmed
    model.plot_pruning(image, processor=processor, cues=True)  # matplotlib Figure: kept + cue heatmaps

Top to bottom:
  token geometry: which region of the ORIGINAL image each visual token covers, per token layout
      (a model class names its layout in `token_layout`; TOKEN_LAYOUTS maps it to its boxes function),
      replayed from the processor's own settings (resize, crop, tiles, padding);
  drawing: a canvas of the image copies with a token index per pixel (Canvas), pruned tokens
      dimmed, kept ones outlined, pixels no token sees hatched; heatmaps of a score per token;
  the API behind the model methods (draw_pruning, plot_pruning) with its checks.

The demo (mfpruner_demo) and the tests draw with these same functions. numpy and PIL are needed
to draw (both are needed by the processors anyway); matplotlib only for heatmaps and figures,
imported on first use. The model methods import this module on the first drawing.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
from PIL import Image

if __package__:  # remote code (transformers_modules.<repo>.<file>): the repo's own sibling files
    from .mfpruner_core import select_best_resolution
else:  # a top-level module of a checkout (tests, tools, the demo), imported by module name
    from importlib import import_module

    select_best_resolution = import_module("mfpruner_core").select_best_resolution


def matplotlib_module() -> ModuleType:
    """matplotlib, imported on first use: the one optional import of the shipped files. Inside a
    `try`, transformers' remote-code check does not demand it of every repo that loads this file."""
    try:
        import matplotlib
        import matplotlib.figure
    except ImportError as error:
        raise ImportError("heatmaps and plot_pruning need matplotlib: pip install matplotlib") from error
    return matplotlib


def result_core(result) -> ModuleType:
    """The `mfpruner_core` module that made `result` (an `MFPrunerResult`). A hub-loaded model runs
    the repo's own copy (`transformers_modules.<repo>.mfpruner_core`), so the layout codes and the
    vote are read from the code the model ran, never from another copy."""
    return sys.modules[type(result).__module__]


# ----------------------------------------------------------------------------- token geometry
# A boxes function: (original image size (w, h), the image processor, the MFPrunerResult, item
# index) -> {map name: (N, 4) boxes}, each box (x0, y0, x1, y1) in original image pixels, one row
# per visual token in the model's token order, NaN for tokens not drawn on that map. Every layout
# has the "main" map; LLaVA-NeXT adds "base" (its base tile) and draws its row-newline tokens on no
# map (they stand for no region). A video's frames: {"frame f": boxes} (video_frame_boxes).


def cell_boxes(x_edges: np.ndarray, y_edges: np.ndarray) -> np.ndarray:
    """(cols + 1,) and (rows + 1,) edges -> (rows * cols, 4) boxes in raster order."""
    x0, y0 = np.meshgrid(x_edges[:-1], y_edges[:-1])  # (rows, cols)
    x1, y1 = np.meshgrid(x_edges[1:], y_edges[1:])
    return np.stack([x0, y0, x1, y1], axis=-1).reshape(-1, 4)


def llava_token_boxes(image_size: tuple[int, int], image_processor, grid: tuple[int, int]) -> np.ndarray:
    """LLaVA-1.5 (CLIPImageProcessor): resize the shortest edge, center-crop, raster patch grid.

    The crop hides the borders of a non-square image from the model: those pixels get no token."""
    width, height = image_size
    rows, cols = grid
    size = image_processor.size
    if size.get("shortest_edge"):  # shortest edge -> s, the long edge scaled and truncated (HF's rule)
        short, long = sorted((width, height))
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        resized_w, resized_h = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        resized_w, resized_h = size["width"], size["height"]
    if getattr(image_processor, "do_center_crop", False):
        crop_w, crop_h = image_processor.crop_size["width"], image_processor.crop_size["height"]
    else:
        crop_w, crop_h = resized_w, resized_h
    left, top = (resized_w - crop_w) // 2, (resized_h - crop_h) // 2
    col_edges = left + np.arange(cols + 1) * crop_w / cols  # in resized pixels
    row_edges = top + np.arange(rows + 1) * crop_h / rows
    return cell_boxes(col_edges, row_edges) * np.array([width / resized_w, height / resized_h] * 2)


def whole_image_grid_boxes(image_size: tuple[int, int], image_processor, grid: tuple[int, int]) -> np.ndarray:
    """A raster grid over the whole image: right for processors that resize without cropping.
    Qwen2.5-VL's `smart_resize` scales the whole image to multiples of 28 px (aspect kept within
    rounding) and each visual token is one 28 x 28 px merged patch, raster order: token (r, c) of
    an (R, C) grid covers exactly rows [r/R, (r+1)/R) and cols [c/C, (c+1)/C) of the image."""
    width, height = image_size
    rows, cols = grid
    return cell_boxes(np.arange(cols + 1) * width / cols, np.arange(rows + 1) * height / rows)


@dataclass
class AnyresGeometry:
    """Where LLaVA-NeXT's high-res grid tokens come from, for one image size (in pixels of the
    padded canvas the processor cuts into tiles): the image resized into `resized` (w, h), pasted
    at `offset` (x, y) into the best pinpoint resolution, cut into `patch` px tokens; the model's
    unpadding then drops `cut` (cols, rows) token columns / rows on each side. `grid` (rows, cols)
    is the unpadded token grid."""

    resized: tuple[int, int]
    offset: tuple[int, int]
    patch: int
    cut: tuple[int, int]
    grid: tuple[int, int]


def anyres_geometry(image_size: tuple[int, int], image_processor, patch_size: int) -> AnyresGeometry:
    """The LLaVA-NeXT image processor's geometry (select_best_resolution, aspect-kept resize,
    centred zero padding) and the model's `unpad_image`, replayed on sizes only."""
    width, height = image_size
    best_h, best_w = select_best_resolution((height, width), image_processor.image_grid_pinpoints)
    scale_w, scale_h = best_w / width, best_h / height
    if scale_w < scale_h:  # transformers' get_patch_output_size
        resized_w, resized_h = best_w, min(math.ceil(height * scale_w), best_h)
    else:
        resized_w, resized_h = min(math.ceil(width * scale_h), best_w), best_h
    offset = ((best_w - resized_w) // 2, (best_h - resized_h) // 2)
    full_rows, full_cols = best_h // patch_size, best_w // patch_size
    if width / height > full_cols / full_rows:  # unpad_image: rows cut top and bottom
        cut_rows = (full_rows - int(round(height * (full_cols / width), 7))) // 2
        cut = (0, cut_rows)
    else:  # columns cut left and right
        cut_cols = (full_cols - int(round(width * (full_rows / height), 7))) // 2
        cut = (cut_cols, 0)
    grid = (full_rows - 2 * cut[1], full_cols - 2 * cut[0])
    return AnyresGeometry((resized_w, resized_h), offset, patch_size, cut, grid)


def llava_next_token_boxes(image_size: tuple[int, int], image_processor, result, image_index: int = 0) -> dict:
    """LLaVA-NeXT (anyres): {"main": the unpadded high-res grid tokens, "base": the base tile's}.

    The base tile is the whole image squashed to one tile, so base token (r, c) covers the cell
    (r, c) of the whole image. A grid token is one patch of the padded, resized canvas: mapped back
    through the padding and the resize, and clipped to the image (tokens at the unpadding edge can
    hold some padding). Newline tokens: NaN on both maps."""
    width, height = image_size
    part, row, col = result.layouts[image_index].numpy().T
    base_rows, base_cols = result.base_grids[image_index]
    patch = image_processor.crop_size["height"] // base_rows
    geometry = anyres_geometry(image_size, image_processor, patch)
    if tuple(result.grids[image_index]) != geometry.grid:
        raise ValueError(
            f"`image` ({width}x{height} px) does not match the pruning result: the processor cuts it into a "
            f"{geometry.grid} token grid, the model's item {image_index} had {tuple(result.grids[image_index])}; "
            "pass the image of that call"
        )
    maps = {name: np.full((len(part), 4), np.nan) for name in ("main", "base")}

    core = result_core(result)
    on_base = part == core.LAYOUT_BASE
    cells = cell_boxes(np.arange(base_cols + 1) * width / base_cols, np.arange(base_rows + 1) * height / base_rows)
    maps["base"][on_base] = cells[row[on_base] * base_cols + col[on_base]]

    on_grid = part == core.LAYOUT_GRID
    (resized_w, resized_h), (offset_x, offset_y), (cut_cols, cut_rows) = geometry.resized, geometry.offset, geometry.cut
    x0 = ((col[on_grid] + cut_cols) * patch - offset_x) * width / resized_w  # canvas px -> original px
    y0 = ((row[on_grid] + cut_rows) * patch - offset_y) * height / resized_h
    x1, y1 = x0 + patch * width / resized_w, y0 + patch * height / resized_h
    boxes = np.stack([x0, y0, x1, y1], axis=-1)
    maps["main"][on_grid] = np.clip(boxes, 0, [width, height, width, height])
    return maps


def llava_boxes(image_size: tuple[int, int], image_processor, result, image_index: int = 0) -> dict:
    """LLaVA-1.5: {"main": the cropped raster grid}. Every image size maps onto the same crop grid."""
    return {"main": llava_token_boxes(image_size, image_processor, tuple(result.grids[image_index]))}


# Copied from transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize (v5.25), without
# its aspect-ratio check: shipped code imports only public transformers API.
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) the Qwen2-VL family's processors resize an image to: multiples of `factor`,
    between min_pixels and max_pixels, the aspect kept within rounding."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_grid(image_size: tuple[int, int], image_processor) -> tuple[int, int]:
    """(rows, cols) of visual tokens the processor makes of an image of `image_size` (w, h)."""
    factor = image_processor.patch_size * image_processor.merge_size
    size = image_processor.size
    height, width = smart_resize(image_size[1], image_size[0], factor, size["shortest_edge"], size["longest_edge"])
    return height // factor, width // factor


def whole_image_boxes(image_size: tuple[int, int], image_processor, result, image_index: int = 0) -> dict:
    """Qwen2.5-VL (smart resize, no crop): {"main": the whole image as the token grid}; refuses an
    image the processor would have made another grid of."""
    grid = tuple(result.grids[image_index])
    if hasattr(image_processor, "merge_size"):
        expected = smart_resize_grid(image_size, image_processor)
        if expected != grid:
            raise ValueError(
                f"`image` ({image_size[0]}x{image_size[1]} px) does not match the pruning result: the processor "
                f"makes a {expected} token grid of it, the model's item {image_index} had {grid}; pass the image of that call"
            )
    return {"main": whole_image_grid_boxes(image_size, image_processor, grid)}


def video_frame_boxes(frame_size: tuple[int, int], num_frames: int, temporal_patch: int, result, index: int) -> dict:
    """A Qwen video: {"frame f": boxes}. The token grid stacks one (R, C) map per `temporal_patch`
    frames top to bottom (result.grids); frame f shows the map of its group, its other tokens NaN."""
    stacked_rows, cols = result.grids[index]
    groups = math.ceil(num_frames / temporal_patch)
    if stacked_rows % groups:
        raise ValueError(
            f"`image` ({num_frames} frames) does not match the pruning result: video {index} has "
            f"{result.grids[index]} tokens, not {groups} groups of {temporal_patch} frames; pass the frames of that call"
        )
    rows = stacked_rows // groups
    frame_grid = whole_image_grid_boxes(frame_size, None, (rows, cols))  # (R * C, 4)
    maps = {}
    for frame in range(num_frames):
        boxes = np.full((stacked_rows * cols, 4), np.nan)
        group = frame // temporal_patch
        boxes[group * rows * cols : (group + 1) * rows * cols] = frame_grid
        maps[f"frame {frame}"] = boxes
    return maps


# A model class's `token_layout` -> its boxes function. A new family whose processor works like one
# of these sets that name (Qwen3-VL: "smart_resize"); a new geometry adds a function here.
TOKEN_LAYOUTS = {
    "center_crop": llava_boxes,  # LLaVA-1.5
    "anyres": llava_next_token_boxes,  # LLaVA-NeXT: high-res tiles + base tile
    "smart_resize": whole_image_boxes,  # Qwen2.5-VL
}


# ----------------------------------------------------------------------------- drawing
# A panel is a canvas: one or more copies of the item (the image with its "main" map; LLaVA-NeXT's
# base tile map at INSET_SCALE to its right; a video's frames in rows), each with a token index per
# pixel, so every drawing works on (pixels, index map) of the whole canvas.

DISPLAY_SIDE = 448  # panels and heatmaps are drawn at this longest side (per copy)
DIM = 0.28  # pruned patches keep this fraction of their brightness ...
DIM_COLOR = np.array([18.0, 20.0, 28.0])  # ... and take the rest from this dark blue-grey
OUTLINE_COLOR = np.array([255.0, 200.0, 40.0])  # a 1 px amber line around the kept regions
HEATMAP_ALPHA = 0.6
HEATMAP_CMAP = "inferno"
UNSEEN = -1  # index map: an image pixel no token covers (e.g. LLaVA-1.5's cropped borders)
GROUND = -2  # index map: canvas pixels outside the image copies
INSET_SCALE = 0.5  # the base tile map is drawn at this size of the main one
INSET_GAP = 12  # px between copies
FRAME_COLUMNS = 4  # a video's frames per row
GROUND_COLOR = 255.0


def token_index_map(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 4) boxes in these pixel units -> (height, width) int map: the token drawn at each
    pixel (pixel centres inside the box), UNSEEN where no token covers the pixel."""
    index_map = np.full((height, width), UNSEEN, dtype=np.int64)
    for token, (x0, y0, x1, y1) in enumerate(boxes):
        if np.isnan(x0):
            continue
        c0, c1 = max(0, math.ceil(x0 - 0.5)), min(width, math.ceil(x1 - 0.5))
        r0, r1 = max(0, math.ceil(y0 - 0.5)), min(height, math.ceil(y1 - 0.5))
        index_map[r0:r1, c0:c1] = token
    return index_map


@dataclass
class Canvas:
    pixels: np.ndarray  # (H, W, 3) float64, the image copies on a white ground
    index_map: np.ndarray  # (H, W) int64: the token drawn at each pixel, UNSEEN or GROUND


def display_copy(image, side: int | None = DISPLAY_SIDE) -> tuple:
    """The image at `side` (longest side; None: its own size) and the scale from original to display pixels."""
    scale = 1.0 if side is None else min(1.0, side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS) if scale < 1.0 else image.copy(), scale


def canvas_copies(item, maps: dict[str, np.ndarray], side: int | None) -> tuple[list, int]:
    """([(picture, boxes in its original pixels, longest side)], copies per row) of a canvas.
    item: one PIL image, or a video's frames (a list of PIL images, maps "frame f")."""
    if "main" not in maps:  # a video: every frame with the tokens of its temporal group
        return [(frame, maps[f"frame {f}"], side) for f, frame in enumerate(item)], FRAME_COLUMNS
    copies = [(item, maps["main"], side)]
    if "base" in maps:
        main_side = max(item.size) if side is None else min(side, max(item.size))  # the main copy's shown side
        copies.append((item, maps["base"], max(1, round(main_side * INSET_SCALE))))
    return copies, len(copies)


def token_canvas(item, maps: dict[str, np.ndarray], side: int | None = DISPLAY_SIDE) -> Canvas:
    """The canvas every panel of this item is drawn on (see the section comment)."""
    copies, per_row = canvas_copies(item, maps, side)
    drawn = [(display_copy(picture, copy_side)[0], picture, boxes) for picture, boxes, copy_side in copies]
    rows = [drawn[i : i + per_row] for i in range(0, len(drawn), per_row)]
    column_widths = [max(row[c][0].width for row in rows if c < len(row)) for c in range(min(per_row, len(drawn)))]
    row_heights = [max(shown.height for shown, _, _ in row) for row in rows]
    width = sum(column_widths) + INSET_GAP * (len(column_widths) - 1)
    height = sum(row_heights) + INSET_GAP * (len(row_heights) - 1)
    pixels = np.full((height, width, 3), GROUND_COLOR)
    index_map = np.full((height, width), GROUND, dtype=np.int64)
    top = 0
    for row, row_height in zip(rows, row_heights):
        left = 0
        for (shown, picture, boxes), column_width in zip(row, column_widths):
            scale = np.array([shown.width / picture.width, shown.height / picture.height] * 2)
            pixels[top : top + shown.height, left : left + shown.width] = np.asarray(shown.convert("RGB"), dtype=np.float64)
            index_map[top : top + shown.height, left : left + shown.width] = token_index_map(
                boxes * scale, shown.width, shown.height
            )
            left += column_width + INSET_GAP
        top += row_height + INSET_GAP
    return Canvas(pixels, index_map)


def to_image(pixels: np.ndarray):
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def unseen_pattern(height: int, width: int) -> np.ndarray:
    """(H, W) bool diagonal hatching, drawn where the model sees no part of the image."""
    rows, cols = np.indices((height, width))
    return ((rows + cols) // 4) % 3 == 0


def shade_unseen(pixels: np.ndarray, index_map: np.ndarray) -> np.ndarray:
    """Greys out and hatches the pixels no token covers (e.g. LLaVA-1.5's cropped borders)."""
    unseen = index_map == UNSEEN
    grey = pixels.mean(axis=-1, keepdims=True) * 0.35 + 150 * 0.65
    hatch = unseen_pattern(*index_map.shape)[..., None]
    shaded = np.where(hatch, grey - 45, grey)
    return np.where(unseen[..., None], np.broadcast_to(shaded, pixels.shape), pixels)


def kept_overlay(canvas: Canvas, keep: np.ndarray):
    """Kept tokens' patches unchanged; pruned patches dimmed (outlined where they touch kept
    ones); unseen borders hatched. keep: (N,) bool."""
    pixels, index_map = canvas.pixels, canvas.index_map
    pruned = (index_map >= 0) & ~keep[np.clip(index_map, 0, None)]
    kept = (index_map >= 0) & ~pruned
    dimmed = pixels * DIM + DIM_COLOR * (1.0 - DIM)
    out = np.where(pruned[..., None], dimmed, pixels)
    # Outline the kept regions on the pruned side, so kept pixels stay exactly the original.
    near_kept = np.zeros_like(kept)
    near_kept[1:] |= kept[:-1]
    near_kept[:-1] |= kept[1:]
    near_kept[:, 1:] |= kept[:, :-1]
    near_kept[:, :-1] |= kept[:, 1:]
    out[pruned & near_kept] = OUTLINE_COLOR
    return to_image(shade_unseen(out, index_map))


def cue_heatmap(canvas: Canvas, scores: np.ndarray, value_range=None):
    """A score per token (N,) as a colormap, alpha-blended over the image; scaled from
    value_range (low, high), by default the scores' own min and max."""
    pixels, index_map = canvas.pixels, canvas.index_map
    low, high = value_range or (float(scores.min()), float(scores.max()))
    normalized = (scores - low) / (high - low) if high > low else np.full_like(scores, 0.5)
    colors = matplotlib_module().colormaps[HEATMAP_CMAP](normalized)[:, :3] * 255.0  # (N, 3)
    blended = pixels * (1.0 - HEATMAP_ALPHA) + colors[np.clip(index_map, 0, None)] * HEATMAP_ALPHA
    return to_image(shade_unseen(np.where((index_map >= 0)[..., None], blended, pixels), index_map))


def token_values(canvas: Canvas, values: np.ndarray) -> np.ndarray:
    """(H, W) float: each pixel's token value, NaN where no token is drawn (the heatmap layer of a figure)."""
    return np.where(canvas.index_map >= 0, values[np.clip(canvas.index_map, 0, None)], np.nan)


# ----------------------------------------------------------------------------- what a result kept


def competing_tokens(result, index: int) -> np.ndarray:
    """(N,) bool: the item's tokens that compete for the budget (all but LLaVA-NeXT's row newlines)."""
    layout = result.layouts[index] if result.layouts else None
    if layout is None:
        return np.ones(result.num_visual_tokens[index], dtype=bool)
    return (layout[:, 0] != result_core(result).LAYOUT_NEWLINE).numpy()


def keep_mask(result, index: int) -> np.ndarray:
    """(N,) bool: the tokens the model kept of item `index`."""
    mask = np.zeros(result.num_visual_tokens[index], dtype=bool)
    mask[result.keep_indices[index].numpy()] = True
    return mask


def single_cue_keeps(result, index: int) -> dict[str, list[int]]:
    """{cue: the tokens that cue alone keeps}: its own top-k over the competing tokens at the kept
    count (newlines kept, as the model does), replayed with the vote of the code the model ran.
    A token's vote count is the number of these sets it is in."""
    core = result_core(result)
    candidates = torch.from_numpy(competing_tokens(result, index))
    kept = int((keep_mask(result, index) & candidates.numpy()).sum())
    return {
        name: core.vote_candidates({name: scores[index].float()[candidates]}, candidates, kept, None, 1, "sum").tolist()
        for name, scores in result.cue_scores.items()
    }


def cue_votes(result, index: int) -> np.ndarray:
    """(N,) int: for each competing token, how many cues keep it on their own (single_cue_keeps)."""
    votes = np.zeros(result.num_visual_tokens[index], dtype=np.int64)
    for kept in single_cue_keeps(result, index).values():
        votes[kept] += 1
    return votes * competing_tokens(result, index)


# ----------------------------------------------------------------------------- the model methods


def checked_result(model, result):
    """`result`, or this thread's `model.last_pruning`; a clear error when there is none."""
    if result is None:
        result = model.last_pruning
        if result is None:
            raise ValueError(
                "`result` was not given and `model.last_pruning` is None: no call on this model in this thread has "
                "pruned yet. A call prunes only when its inputs hold pixels (`pixel_values`, or "
                "`pixel_values_videos` for Qwen videos) and pruning is on: check that the processor was given "
                "`images=` and returned them (a tokenizer alone ignores images), then call generate() / forward() "
                "with them before drawing"
            )
    if not hasattr(result, "keep_indices") or not hasattr(result, "cue_scores"):
        raise ValueError(f"`result` must be an MFPrunerResult (output.pruning or model.last_pruning), got {type(result).__name__}")
    return result


def checked_index(result, index) -> int:
    count = len(result.keep_indices)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < count:
        items = ", ".join(f"{i}: {kind}" for i, kind in enumerate(result.kinds or ["image"] * count))
        raise ValueError(
            f"`index` must be an int in [0, {count}): the images / videos of the call in prompt order "
            f"({items}), got {index!r}"
        )
    return int(index)


def image_processor_of(model, processor, kind: str):
    """The image processor whose geometry the call used: from `processor` (a processor or an image
    processor), else the repo's own saved one (local files only)."""
    if processor is None:
        from transformers import AutoImageProcessor

        source = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
        try:
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=True, trust_remote_code=True)
        except (OSError, ValueError) as error:  # no such folder / file, or no image processor in it
            raise ValueError(
                f"`processor` was not given and the model's folder {source!r} has no image processor to read the "
                "geometry from: pass the processor that made the inputs (processor=processor)"
            ) from error
    image_processor = getattr(processor, "image_processor", processor)
    if kind == "video":
        return getattr(processor, "video_processor", None) or image_processor
    if not hasattr(image_processor, "size"):
        raise ValueError(
            f"`processor` must be the processor that made the inputs (or its image processor), got "
            f"{type(processor).__name__}, which has no image geometry (a tokenizer alone ignores images)"
        )
    return image_processor


def as_picture(image):
    """A PIL image (RGB) of one image: PIL, or an (H, W, 3) array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if array.dtype != np.uint8:
            array = array * 255.0 if array.max() <= 1.0 else array
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)[..., :3])
    raise ValueError(f"`image` must be a PIL image or an (H, W, 3) array, got {type(image).__name__} of shape {array.shape}")


def as_frames(video) -> list:
    """PIL frames of one video: a list of images, or a (T, H, W, 3) / (T, 3, H, W) array or tensor."""
    if isinstance(video, (list, tuple)):
        return [as_picture(frame) for frame in video]
    array = video.detach().cpu().numpy() if hasattr(video, "detach") else np.asarray(video)
    if array.ndim == 4 and array.shape[1] == 3 and array.shape[-1] != 3:
        array = array.transpose(0, 2, 3, 1)  # (T, 3, H, W) -> (T, H, W, 3)
    if array.ndim != 4:
        raise ValueError(f"`image` of a video must be its frames (a list, or (T, H, W, 3)), got shape {array.shape}")
    return [as_picture(frame) for frame in array]


def item_maps(model, item, processor, result, index: int) -> tuple[object, dict]:
    """(the picture or frames, {map name: boxes}) of item `index`, checked against the result."""
    layout = getattr(model, "token_layout", None)
    if layout not in TOKEN_LAYOUTS:
        raise ValueError(
            f"{type(model).__name__} names no token layout (`token_layout` = {layout!r}; known: {sorted(TOKEN_LAYOUTS)})"
        )
    kind = result.kinds[index] if result.kinds else "image"
    image_processor = image_processor_of(model, processor, kind)
    if kind == "video":
        frames = as_frames(item)
        temporal_patch = getattr(image_processor, "temporal_patch_size", None) or 2
        maps = video_frame_boxes(frames[0].size, len(frames), temporal_patch, result, index)
        return frames, maps
    if isinstance(item, (list, tuple)):
        raise ValueError(f"`image` must be the one image of item {index} (an image), got a {type(item).__name__}")
    picture = as_picture(item)
    return picture, checked_box_counts(TOKEN_LAYOUTS[layout](picture.size, image_processor, result, index), result, index)


def checked_box_counts(maps: dict, result, index: int) -> dict:
    """`maps`, once every map has one box per visual token of item `index`."""
    for name, boxes in maps.items():
        if len(boxes) != result.num_visual_tokens[index]:
            raise ValueError(f"`processor` gives {len(boxes)} '{name}' boxes for {result.num_visual_tokens[index]} visual tokens")
    return maps


def draw_pruning(model, image, processor=None, result=None, index: int = 0, base_tile: bool = False):
    """`image` with every pruned token's region dimmed, the kept regions outlined and the pixels no
    token sees hatched: a PIL image of the same size (a video: its frames in rows of FRAME_COLUMNS,
    each with the tokens of its frame group). image: the image (or video frames) of item `index` of
    the call; base_tile: LLaVA-NeXT's base tile tokens instead of the high-res grid's."""
    result = checked_result(model, result)
    index = checked_index(result, index)
    picture, maps = item_maps(model, image, processor, result, index)
    if base_tile:
        if "base" not in maps:
            raise ValueError(f"`base_tile=True` needs a model with a base tile (LLaVA-NeXT), not {type(model).__name__}")
        maps = {"main": maps["base"]}
    elif "base" in maps:
        maps = {"main": maps["main"]}
    return kept_overlay(token_canvas(picture, maps, side=None), keep_mask(result, index))


def call_settings(result) -> str:
    """The settings a result's call used, for titles."""
    budget = (
        f"budget={result.visual_token_budget}" if result.visual_token_budget is not None
        else f"ratio={result.visual_token_ratio}"
    )
    parts = [budget, f"min_votes={result.min_votes}", f"fill_by={result.fill_by}"]
    if result.relevance_source:
        parts.append(f"relevance from {result.relevance_source}")
    return ", ".join(parts)


def plot_pruning(model, image, processor=None, result=None, index: int = 0, cues: bool = True, panel_size: float = 3.6):
    """A matplotlib Figure: the kept panel (LLaVA-NeXT: with its base tile; a video: every frame),
    then with cues=True one heatmap per cue (the raw score of each token, with its colour bar) and
    the vote count (how many cues keep the token on their own); titled with kept / total and the
    call's settings."""
    Figure = matplotlib_module().figure.Figure
    result = checked_result(model, result)
    index = checked_index(result, index)
    picture, maps = item_maps(model, image, processor, result, index)
    canvas = token_canvas(picture, maps)
    keep, competing = keep_mask(result, index), competing_tokens(result, index)
    kept, total = int((keep & competing).sum()), int(competing.sum())  # LLaVA-NeXT's newlines: outside the budget
    layers = {}
    if cues:
        layers = {name: scores[index].float().numpy() for name, scores in result.cue_scores.items()}
        layers["votes"] = cue_votes(result, index).astype(np.float64)
    height, width = canvas.index_map.shape
    figure = Figure(figsize=(panel_size * (1 + len(layers)), panel_size * height / width + 0.8), layout="constrained")
    axes = figure.subplots(1, 1 + len(layers), squeeze=False)[0]
    axes[0].imshow(kept_overlay(canvas, keep))
    axes[0].set_title(f"kept {kept} / {total}")
    background = to_image(shade_unseen(canvas.pixels, canvas.index_map))
    for ax, (name, values) in zip(axes[1:], layers.items()):
        ax.imshow(background)
        low, high = (0.0, float(len(result.cue_scores))) if name == "votes" else (None, None)
        layer = ax.imshow(token_values(canvas, values), cmap=HEATMAP_CMAP, alpha=HEATMAP_ALPHA, vmin=low, vmax=high)
        figure.colorbar(layer, ax=ax, shrink=0.8)
        ax.set_title(name if name != "votes" else "votes (cues keeping it)")
    for ax in axes:
        ax.set_axis_off()
    kind = result.kinds[index] if result.kinds else "image"
    figure.suptitle(f"{kind} {index}: kept {kept} of {total} visual tokens ({call_settings(result)})")
    return figure
