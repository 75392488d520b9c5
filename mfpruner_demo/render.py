"""Drawing: every visual token over the region of the ORIGINAL image it covers.

A panel is a canvas: the image at display size with the "main" token map, and for LLaVA-NeXT a
smaller copy to its right with the base tile's tokens. Every drawing works on (pixels, index
map) of the whole canvas, so the base tile's tokens are dimmed / coloured like the others. The
token boxes come from each family's function in the registry (mfpruner_lib.token_geometry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib
import numpy as np
from PIL import Image

from mfpruner_lib.families import by_model_type
from mfpruner_lib.token_geometry import whole_image_boxes

DISPLAY_SIDE = 448  # panels and heatmaps are drawn at this longest side
DIM = 0.28  # pruned patches keep this fraction of their brightness ...
DIM_COLOR = np.array([18.0, 20.0, 28.0])  # ... and take the rest from this dark blue-grey
OUTLINE_COLOR = np.array([255.0, 200.0, 40.0])  # a 1 px amber line around the kept regions
HEATMAP_ALPHA = 0.6
HEATMAP_CMAP = "inferno"
UNSEEN = -1  # index map: an image pixel no token covers (e.g. LLaVA-1.5's cropped borders)
GROUND = -2  # index map: canvas pixels outside the image copies (the drawing section's canvas)


def token_maps(demo, image_size: tuple[int, int], result, image_index: int = 0) -> dict[str, np.ndarray]:
    """{map name: (N, 4) boxes} of image `image_index`'s visual tokens, in original image pixels."""
    family = by_model_type(demo.family)
    if family is None:
        import gradio as gr

        gr.Warning(f"No token-to-region mapping for model family '{demo.family}': drawn as a whole-image grid.")
    boxes_fn = family.token_boxes if family is not None else whole_image_boxes
    maps = boxes_fn(image_size, demo.processor.image_processor, result, image_index)
    for name, boxes in maps.items():
        if len(boxes) != result.num_visual_tokens[image_index]:
            raise RuntimeError(f"{len(boxes)} '{name}' boxes for {result.num_visual_tokens[image_index]} visual tokens")
    return maps


def token_index_map(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 4) boxes in these pixel units -> (height, width) int map: the token drawn at each
    pixel (pixel centres inside the box), -1 where no token covers the pixel."""
    index_map = np.full((height, width), UNSEEN, dtype=np.int64)
    for token, (x0, y0, x1, y1) in enumerate(boxes):
        if np.isnan(x0):
            continue
        c0, c1 = max(0, math.ceil(x0 - 0.5)), min(width, math.ceil(x1 - 0.5))
        r0, r1 = max(0, math.ceil(y0 - 0.5)), min(height, math.ceil(y1 - 0.5))
        index_map[r0:r1, c0:c1] = token
    return index_map


# ----------------------------------------------------------------------------- drawing

INSET_SCALE = 0.5  # the base tile map is drawn at this size of the main one
INSET_GAP = 12  # px between the main map and the base tile map
GROUND_COLOR = 255.0


@dataclass
class Canvas:
    pixels: np.ndarray  # (H, W, 3) float64, the image copies on a white ground
    index_map: np.ndarray  # (H, W) int64: the token drawn at each pixel, UNSEEN or GROUND


def display_copy(image: Image.Image, side: int = DISPLAY_SIDE) -> tuple[Image.Image, float]:
    """The image at `side` (longest side) and the scale from original to display pixels."""
    scale = min(1.0, side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS) if scale < 1.0 else image.copy(), scale


def token_canvas(image: Image.Image, maps: dict[str, np.ndarray]) -> Canvas:
    """The canvas every panel of this image is drawn on (see the section comment)."""
    display, _ = display_copy(image)
    copies = [(display, maps["main"])]
    if "base" in maps:
        inset, _ = display_copy(image, max(1, round(max(display.size) * INSET_SCALE)))
        copies.append((inset, maps["base"]))
    height = max(copy.height for copy, _ in copies)
    width = sum(copy.width for copy, _ in copies) + INSET_GAP * (len(copies) - 1)
    pixels = np.full((height, width, 3), GROUND_COLOR)
    index_map = np.full((height, width), GROUND, dtype=np.int64)
    left = 0
    for copy, boxes in copies:
        scale = np.array([copy.width / image.width, copy.height / image.height] * 2)
        pixels[: copy.height, left : left + copy.width] = np.asarray(copy, dtype=np.float64)
        index_map[: copy.height, left : left + copy.width] = token_index_map(boxes * scale, copy.width, copy.height)
        left += copy.width + INSET_GAP
    return Canvas(pixels, index_map)


def to_image(pixels: np.ndarray) -> Image.Image:
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


def kept_overlay(canvas: Canvas, keep: np.ndarray) -> Image.Image:
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


def cue_heatmap(canvas: Canvas, scores: np.ndarray, value_range=None) -> Image.Image:
    """A score per token (N,) as a colormap, alpha-blended over the image; scaled from
    value_range (low, high), by default the scores' own min and max."""
    pixels, index_map = canvas.pixels, canvas.index_map
    low, high = value_range or (float(scores.min()), float(scores.max()))
    normalized = (scores - low) / (high - low) if high > low else np.full_like(scores, 0.5)
    colors = matplotlib.colormaps[HEATMAP_CMAP](normalized)[:, :3] * 255.0  # (N, 3)
    blended = pixels * (1.0 - HEATMAP_ALPHA) + colors[np.clip(index_map, 0, None)] * HEATMAP_ALPHA
    return to_image(shade_unseen(np.where((index_map >= 0)[..., None], blended, pixels), index_map))
