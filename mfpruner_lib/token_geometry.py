"""Which region of the ORIGINAL image each visual token covers, per model family.

A token-boxes function: (original image size (w, h), the image processor, the model's
MFPrunerResult, image index) -> {map name: (N, 4) boxes}, each box (x0, y0, x1, y1) in original
image pixels, one row per visual token in the model's token order, NaN for tokens not drawn on that
map. Every family has the "main" map; LLaVA-NeXT adds "base" (its base tile) and draws its
row-newline tokens on no map (they stand for no region). The registry (mfpruner_lib.families)
names each family's function; the demo draws with them.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from types import ModuleType

import numpy as np


def result_core(result) -> ModuleType:
    """The `mfpruner_core` module that made `result` (an `MFPrunerResult`). A hub-loaded model runs
    the repo's own copy (`transformers_modules.<repo>.mfpruner_core`), so the demo replays the vote
    and reads the layout codes with the code the model ran, never with another copy."""
    return sys.modules[type(result).__module__]


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
    from transformers.image_processing_utils import select_best_resolution

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
        raise RuntimeError(f"the model's grid {result.grids[image_index]} differs from the processor's {geometry.grid}")
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
    """LLaVA-1.5: {"main": the cropped raster grid}."""
    return {"main": llava_token_boxes(image_size, image_processor, tuple(result.grids[image_index]))}


def whole_image_boxes(image_size: tuple[int, int], image_processor, result, image_index: int = 0) -> dict:
    """Qwen2.5-VL (and any processor that resizes without cropping): {"main": the whole image as the token grid}."""
    return {"main": whole_image_grid_boxes(image_size, image_processor, tuple(result.grids[image_index]))}
