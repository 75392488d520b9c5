"""MFPruner demo: upload a picture, ask a question, slide the visual-token budget, and see which
visual tokens MFPruner keeps, what each cue alone would keep at the same budget, and how much
shorter and faster the language model's prefill gets.

    pip install -r requirements.txt && python app.py            # built-in tiny LLaVA-1.5, random weights
    python app.py --tiny llava_next                              # tiny LLaVA-NeXT (or qwen2_5_vl), random weights
    python app.py --model <hub id or local MFPruner repo>        # a real model (or MFPRUNER_MODEL=...)

The page, top to bottom: inputs and stats; the panel row (original image, the tokens each single
cue keeps, the tokens MFPruner keeps, pruned patches dimmed); one continuous heatmap per cue.
Every token is drawn over the region of the ORIGINAL image it covers (`TOKEN_BOXES`, one small
function per model family), so non-square images, cropped borders, LLaVA-NeXT's anyres tiles
and Qwen2.5-VL's resized grids show correctly.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import statistics
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import gradio as gr
import matplotlib
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tools.bench_utils import time_interleaved
from tools.flops import fastv_flops

try:  # Hugging Face ZeroGPU Spaces: the model calls run on a GPU borrowed per call
    import spaces

    gpu = spaces.GPU
except ImportError:  # anywhere else: a plain call

    def gpu(fn):
        return fn


logger = logging.getLogger("mfpruner.app")

MODEL_ENV = "MFPRUNER_MODEL"
MAX_PIXELS = 50_000_000  # refuse larger uploads: decoding them costs seconds and gigabytes
MAX_SIDE = 2048  # downscale larger uploads; the processors resize to a few hundred px anyway
DISPLAY_SIDE = 448  # panels and heatmaps are drawn at this longest side
MAX_QUESTION_CHARS = 1000
MAX_NEW_TOKENS = 48
TIMING_REPEATS = 3  # timed prefills per setting (after one warm-up each); the median is shown
# Every run writes its 11 panels (~3 MB of PNG) and the upload to Gradio's cache: every 5 minutes,
# delete those older than 30 minutes (and all of them when the server stops)
CACHE_CLEANUP = (300, 1800)
DIM = 0.28  # pruned patches keep this fraction of their brightness ...
DIM_COLOR = np.array([18.0, 20.0, 28.0])  # ... and take the rest from this dark blue-grey
OUTLINE_COLOR = np.array([255.0, 200.0, 40.0])  # a 1 px amber line around the kept regions
HEATMAP_ALPHA = 0.6
HEATMAP_CMAP = "inferno"
CUE_TITLES = {"attention": "[CLS] attention", "uniqueness": "uniqueness", "relevance": "relevance"}
EXAMPLE_QUESTIONS = {
    "grace_hopper.jpg": "Who is the person in the picture, and what is she wearing?",
    "logo2.png": "What does the logo say?",
    "Minduka_Present_Blue_Pack.png": "What color is the present?",
}


# ----------------------------------------------------------------------------- model


@dataclass
class DemoModel:
    """The loaded model and what the page needs to know about it."""

    model: torch.nn.Module
    processor: object
    name: str
    family: str  # key into TOKEN_BOXES: "llava", "llava_next", "qwen2_5_vl"
    random_weights: bool
    device: torch.device


def result_core(result) -> ModuleType:
    """The `mfpruner_core` module that made `result` (an `MFPrunerResult`). A hub-loaded model runs
    the repo's own copy (`transformers_modules.<repo>.mfpruner_core`), so the demo replays the vote
    and reads the layout codes with the code the model ran, never with another copy."""
    return sys.modules[type(result).__module__]


def model_family(config) -> str:
    """'mfpruner_llava' -> 'llava', 'mfpruner_qwen2_5_vl' -> 'qwen2_5_vl'."""
    return config.model_type.removeprefix("mfpruner_")


# LLaVA-1.6's anyres resolutions (llava-hf/llava-v1.6-*): 336 px tiles, up to 2 x 2 (or 1 x 3).
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_FAMILIES = {  # family: (name, token geometry)
    "llava": ("tiny MFPruner LLaVA-1.5", "LLaVA-1.5 geometry: 576 visual tokens"),
    "llava_next": ("tiny MFPruner LLaVA-NeXT", "LLaVA-1.6 anyres tiles: up to 2,928 visual tokens"),
    "qwen2_5_vl": ("tiny MFPruner Qwen2.5-VL", "Qwen2.5-VL geometry: 28 px per visual token, up to 1,024"),
}


def build_default_model(folder: str | os.PathLike, family: str = "llava") -> Path:
    """The built-in defaults: tiny MFPruner models with random weights and the real models' token
    geometry, built locally, no download. llava: LLaVA-1.5 (336 px, 14 px patches: 24 x 24 = 576
    tokens); llava_next: LLaVA-1.6 (336 px tiles, its pinpoints); qwen2_5_vl: Qwen2.5-VL (28 px per
    token, images resized to at most 1,024 tokens)."""
    from tools import tiny_models

    folder = Path(folder)
    if family == "llava":
        return tiny_models.build_tiny_llava(folder / "tiny-mfpruner-llava", image_size=336, visual_token_budget=64)
    if family == "llava_next":
        return tiny_models.build_tiny_llava_next(
            folder / "tiny-mfpruner-llava-next", tile_size=336, grid_pinpoints=LLAVA_NEXT_PINPOINTS
        )
    if family == "qwen2_5_vl":
        path = tiny_models.build_tiny_qwen2_5_vl(folder / "tiny-mfpruner-qwen2_5_vl")
        _, image_processor = tiny_models.build_tiny_qwen2_5_vl_processor(max_pixels=28 * 28 * 1024)
        image_processor.save_pretrained(path)
        return path
    raise ValueError(f"`--tiny` must be one of {sorted(TINY_FAMILIES)}, got {family!r}")


class QwenInputsProcessor:
    """Tokenizer + image processor in place of `Qwen2_5_VLProcessor`, for repos without a full
    processor: in transformers 5.x that processor cannot be built without torchvision (its video
    processor needs it), which CPU set-ups here lack. Images only; the placeholders are expanded
    exactly as the processor does (`tools.tiny_models.qwen_inputs`)."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def __call__(self, images, text: str, return_tensors: str = "pt"):
        from transformers import BatchFeature

        from tools.tiny_models import qwen_inputs

        return BatchFeature(qwen_inputs(self.tokenizer, self.image_processor, [text], images=[images]))

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)


def load_processor(spec: str, family: str):
    """The repo's processor; for Qwen2.5-VL without a usable one, tokenizer + image processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(spec, trust_remote_code=True)
    except (ImportError, OSError, ValueError, TypeError):
        if family != "qwen2_5_vl":
            raise
        processor = None
    if hasattr(processor, "image_processor"):
        return processor
    if family != "qwen2_5_vl":
        raise ValueError(f"{spec} has no image processor (AutoProcessor gave {type(processor).__name__})")
    tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=True)
    return QwenInputsProcessor(tokenizer, AutoImageProcessor.from_pretrained(spec, trust_remote_code=True))


def load_model(spec: str | None = None, tiny: str = "llava") -> DemoModel:
    """spec: a hub id or a local MFPruner repo; None builds the tiny random-weights model of the
    `tiny` family in a temporary folder, removed once the model and processor are loaded (nothing
    is read from it later), quietly: its progress bars say nothing the user can act on."""
    if spec is not None:
        return load_repo(spec, spec, random_weights=False)
    with tempfile.TemporaryDirectory(prefix="mfpruner-demo-") as folder, progress_bars_off():
        path = build_default_model(folder, tiny)
        return load_repo(str(path), f"{TINY_FAMILIES[tiny][0]} (random weights)", random_weights=True)


def load_repo(spec: str, name: str, random_weights: bool) -> DemoModel:
    from transformers import AutoModelForImageTextToText

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(spec, trust_remote_code=True, dtype=dtype)
    family = model_family(model.config)
    processor = load_processor(spec, family)
    return DemoModel(model.to(device).eval(), processor, name, family, random_weights, device)


@contextlib.contextmanager
def progress_bars_off():
    """transformers' progress bars (writing and loading the shards) off for a moment."""
    from transformers.utils import logging as transformers_logging

    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()


# ----------------------------------------------------------------------------- input checks


def load_image(path: str | os.PathLike | None) -> tuple[Image.Image, list[str]]:
    """Opens an upload as an RGB image. Returns (image, notes about what was changed);
    raises ValueError with a message for the user when the file cannot be used."""
    if path is None:
        raise ValueError("Upload an image (or pick one of the examples) first.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ValueError(
                    f"The image is {width} x {height} px ({width * height / 1e6:.0f} MP); this demo takes at most "
                    f"{MAX_PIXELS / 1e6:.0f} MP. Please upload a smaller image."
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"The image is too large to decode safely; this demo takes at most {MAX_PIXELS / 1e6:.0f} MP.")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"Could not read the file as an image (corrupt, truncated, or not an image): {error}")

    notes = []
    if getattr(image, "n_frames", 1) > 1:
        notes.append(f"The file has {image.n_frames} frames; the first one is used.")
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        original_mode = image.mode
        has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
        if has_alpha:  # composite on white: transparent pixels carry arbitrary colours
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
            notes.append(f"Converted the {original_mode} image to RGB (transparent areas on white).")
        else:
            image = image.convert("RGB")
            notes.append(f"Converted the {original_mode} image to RGB.")
    if max(image.size) > MAX_SIDE:
        old = image.size
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        notes.append(f"Downscaled the image from {old[0]} x {old[1]} to {image.size[0]} x {image.size[1]} px.")
    return image, notes


def upload_path(upload) -> str | None:
    """The file path of a raw gr.Image payload ({"path": ...}), or a path given as is."""
    if upload is None or isinstance(upload, (str, os.PathLike)):
        return upload
    return upload.get("path") if isinstance(upload, dict) else getattr(upload, "path", None)


def is_number(value) -> bool:
    """A finite int or float (not a bool, a string, None, NaN or infinity: the API passes any JSON)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_question(question: str | None) -> str:
    question = (question or "").strip()
    if not question:
        raise ValueError("Type a question about the image: the relevance cue ranks the tokens against it.")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"The question has {len(question)} characters; at most {MAX_QUESTION_CHARS} are allowed.")
    return question


# ----------------------------------------------------------------------------- token -> image region
#
# One function per model family (TOKEN_BOXES): (original image size, image processor, the model's
# MFPrunerResult, image index) -> {map name: (N, 4) boxes}, each box (x0, y0, x1, y1) in ORIGINAL
# image pixels, one row per visual token in the model's token order, NaN for tokens not drawn on
# that map. Every family has the "main" map; LLaVA-NeXT adds "base" (its base tile) and draws its
# row-newline tokens on no map (they stand for no region).


UNSEEN = -1  # index map: an image pixel no token covers (e.g. LLaVA-1.5's cropped borders)
GROUND = -2  # index map: canvas pixels outside the image copies (the drawing section's canvas)


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


TOKEN_BOXES = {
    "llava": lambda size, processor, result, i: {"main": llava_token_boxes(size, processor, tuple(result.grids[i]))},
    "llava_next": llava_next_token_boxes,
    "qwen2_5_vl": lambda size, processor, result, i: {
        "main": whole_image_grid_boxes(size, processor, tuple(result.grids[i]))
    },
}


def token_maps(demo: DemoModel, image_size: tuple[int, int], result, image_index: int = 0) -> dict[str, np.ndarray]:
    """{map name: (N, 4) boxes} of image `image_index`'s visual tokens, in original image pixels."""
    boxes_fn = TOKEN_BOXES.get(demo.family)
    if boxes_fn is None:
        gr.Warning(f"No token-to-region mapping for model family '{demo.family}': drawn as a whole-image grid.")
        boxes_fn = TOKEN_BOXES["qwen2_5_vl"]
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
#
# A panel is a canvas: the image at display size with the "main" token map, and for LLaVA-NeXT a
# smaller copy to its right with the base tile's tokens. Every drawing works on (pixels, index
# map) of the whole canvas, so the base tile's tokens are dimmed / coloured like the others.

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


# ----------------------------------------------------------------------------- FLOPs


# ----------------------------------------------------------------------------- the analysis


@dataclass
class Analysis:
    """Everything one run shows. panels: title -> image; heatmaps: cue -> image."""

    panels: dict[str, Image.Image]
    heatmaps: dict[str, Image.Image]
    stats: dict
    answer: str | None = None
    notes: list[str] = field(default_factory=list)


def build_inputs(demo: DemoModel, image: Image.Image, question: str) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = demo.processor.apply_chat_template(messages, add_generation_prompt=True)
    return demo.processor(images=image, text=prompt, return_tensors="pt").to(demo.device)


def visual_token_count(demo: DemoModel, image: Image.Image) -> int:
    """Visual tokens of this image that compete for the budget: the processor's image
    placeholders, less LLaVA-NeXT's row newlines (kept outside the budget)."""
    inputs = build_inputs(demo, image, "?")
    count = int((inputs["input_ids"] == demo.model.config.image_token_id).sum())
    if demo.family == "llava_next":
        vision = demo.model.config.vision_config
        count -= anyres_geometry(image.size, demo.processor.image_processor, vision.patch_size).grid[0]
    return count


@torch.no_grad()
def timed_prefills(demo: DemoModel, inputs: dict, prune_kwargs: dict, repeats: int = TIMING_REPEATS):
    """Prefill (one forward pass over the prompt, KV cache on, last logits only) with and without
    pruning, alternated after one warm-up round. Returns (median pruned s, median unpruned s,
    the pruned call's MFPrunerResult)."""
    calls = {
        setting: (lambda kwargs=kwargs: demo.model(**inputs, **kwargs, use_cache=True, logits_to_keep=1))
        for setting, kwargs in (("unpruned", {"prune_visual_tokens": False}), ("pruned", prune_kwargs))
    }
    times = time_interleaved(calls, repeats=repeats, warmup=1, device=str(demo.device))
    # The pruned call runs last in every round, and the unpruned one leaves last_pruning alone.
    return statistics.median(times["pruned"]), statistics.median(times["unpruned"]), demo.model.last_pruning


def clean_text(text: str) -> str:
    """Answers of the random-weights model hold control characters; keep them readable."""
    return "".join(ch if ch.isprintable() or ch == "\n" else "\N{REPLACEMENT CHARACTER}" for ch in text).strip()


@torch.no_grad()
def generate_answers(demo: DemoModel, inputs: dict, prune_kwargs: dict, max_new_tokens: int):
    """Greedy answers (pruned, unpruned): with MFPruner's pruning and with the stock model."""
    prompt_length = inputs["input_ids"].shape[1]
    answers = []
    for kwargs in (prune_kwargs, {"prune_visual_tokens": False}):
        output = demo.model.generate(**inputs, **kwargs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(clean_text(demo.processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)[0]))
    return answers[0], answers[1]


def analyze(
    demo: DemoModel,
    image_path,
    question,
    budget_mode: str = "tokens",
    budget: int = 64,
    ratio: float = 0.111,
    min_votes: int = 2,
    generate_answer: bool = False,
    progress=None,
    timing_repeats: int = TIMING_REPEATS,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> Analysis:
    """One demo run: check the inputs, prefill pruned and unpruned, draw, count. Raises
    ValueError with a message for the user on bad input."""
    progress = progress or (lambda *args, **kwargs: None)
    progress(0.0, desc="Reading the image")
    image, notes = load_image(image_path)
    question = check_question(question)
    if budget_mode == "tokens":
        if not is_number(budget) or budget != int(budget) or budget < 1:
            raise ValueError(f"The token budget must be a whole number >= 1, got {budget!r}.")
        prune_kwargs = {"visual_token_budget": int(budget)}
    elif budget_mode == "ratio":
        if not is_number(ratio) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"The keep ratio must be in (0, 1], got {ratio!r}.")
        prune_kwargs = {"visual_token_ratio": float(ratio)}
    else:
        raise ValueError(f"The budget mode must be 'tokens' or 'ratio', got {budget_mode!r}.")
    if not is_number(min_votes) or min_votes not in range(1, len(CUE_TITLES) + 1):
        raise ValueError(f"The vote threshold must be 1, 2 or 3, got {min_votes!r}.")

    prune_kwargs["min_votes"] = int(min_votes)  # per call: the model's config is never touched

    inputs = build_inputs(demo, image, question)
    progress(0.15, desc="Prefill, pruned and unpruned (timed)")
    pruned_s, unpruned_s, result = timed_prefills(demo, inputs, prune_kwargs, timing_repeats)
    keep_indices = result.keep_indices[0]
    num_tokens = result.num_visual_tokens[0]  # all of the image's tokens, LLaVA-NeXT's newlines included
    # The tokens that compete for the budget: all but LLaVA-NeXT's row newlines, which the model
    # keeps outside the budget (they stand for no region and are drawn on no map).
    layout = result.layouts[0] if result.layouts else None
    core = result_core(result)  # the vote and layout codes of the code the model ran
    candidates = torch.ones(num_tokens, dtype=torch.bool) if layout is None else layout[:, 0] != core.LAYOUT_NEWLINE
    total = int(candidates.sum())
    newlines = num_tokens - total
    kept = len(keep_indices) - newlines
    answer = None
    if generate_answer:
        progress(0.6, desc="Generating the answers")
        pruned_answer, full_answer = generate_answers(demo, inputs, prune_kwargs, max_new_tokens)
        answer = f"MFPruner ({kept} visual tokens): {pruned_answer}\n\nUnpruned ({total} visual tokens): {full_answer}"

    progress(0.85, desc="Drawing")
    canvas = token_canvas(image, token_maps(demo, image.size, result))

    def mask_of(indices: torch.Tensor) -> np.ndarray:
        mask = np.zeros(num_tokens, dtype=bool)
        mask[indices.numpy()] = True
        return mask

    panels = {"original": to_image(shade_unseen(canvas.pixels, canvas.index_map))}
    heatmaps, cue_kept = {}, {}
    votes = np.zeros(num_tokens, dtype=np.int64)
    for name, per_image in result.cue_scores.items():
        scores = per_image[0].float()
        # That cue alone: its own top-k over the candidates at the same budget (newlines kept, as the model does).
        single = core.vote_candidates({name: scores[candidates]}, candidates, kept, None, 1, "sum")
        cue_kept[name] = single.tolist()
        votes += mask_of(single) & candidates.numpy()
        panels[name] = kept_overlay(canvas, mask_of(single))
        heatmaps[name] = cue_heatmap(canvas, scores.numpy())
    panels["mfpruner"] = kept_overlay(canvas, mask_of(keep_indices))
    heatmaps["votes"] = cue_heatmap(canvas, votes.astype(np.float64), (0.0, float(len(cue_kept))))

    text = demo.model.config.get_text_config()
    dims = (text.hidden_size, text.intermediate_size, text.num_hidden_layers)
    full_length = int(inputs["input_ids"].shape[1])
    pruned_length = int(result.lm_input_length)
    # FastV's visual-token FLOPs over the image tokens the LLM sees (LLaVA-NeXT: newlines included).
    visual_full, visual_pruned = fastv_flops(num_tokens, *dims), fastv_flops(kept + newlines, *dims)
    prefill_full, prefill_pruned = fastv_flops(full_length, *dims), fastv_flops(pruned_length, *dims)
    stats = {
        "model": demo.name,
        "random_weights": demo.random_weights,
        "image_size": list(image.size),
        "visual_tokens": total,
        "kept": kept,
        "newline_tokens": newlines,
        "kept_indices": keep_indices.tolist(),
        "cue_kept_indices": cue_kept,
        "votes": votes.tolist(),
        "min_votes": int(min_votes),
        "budget": prune_kwargs,
        "prefill_length_unpruned": full_length,
        "prefill_length_pruned": pruned_length,
        "visual_flops_unpruned": visual_full,
        "visual_flops_pruned": visual_pruned,
        "visual_flops_saved": 1.0 - visual_pruned / visual_full,
        "prefill_flops_unpruned": prefill_full,
        "prefill_flops_pruned": prefill_pruned,
        "prefill_flops_saved": 1.0 - prefill_pruned / prefill_full,
        "prefill_seconds_unpruned": unpruned_s,
        "prefill_seconds_pruned": pruned_s,
        "speedup": unpruned_s / pruned_s,
        "timing_repeats": timing_repeats,
        "device": str(demo.device),
    }
    progress(1.0, desc="Done")
    return Analysis(panels, heatmaps, stats, answer, notes)


# ----------------------------------------------------------------------------- page text


def format_flops(flops: float) -> str:
    for unit, size in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if flops >= size:
            return f"{flops / size:.2f} {unit}"
    return f"{flops:.0f} FLOPs"


TINY_PREFILL_NOTE = (
    "\n*Why the measured prefill barely shortens here:* this tiny model's language model is so small that "
    "the vision tower (which runs in full either way) and fixed per-call costs take most of the time. In a "
    "real 7B model the language model dominates the prefill and its time falls with the pruned FLOPs: "
    "ideal and measured speed-ups per model are on the project's *Benchmarks* page (docs/benchmarks.md)."
)


def stats_markdown(stats: dict) -> str:
    s = stats
    fraction = s["kept"] / s["visual_tokens"]
    return "\n".join(
        [
            f"### Kept {s['kept']} / {s['visual_tokens']} visual tokens ({fraction:.1%})",
            *(
                [f"Plus {s['newline_tokens']} row-newline tokens (LLaVA-NeXT), always kept, outside the budget."]
                if s["newline_tokens"]
                else []
            ),
            "",
            "| | unpruned | MFPruner | saved |",
            "|:--|--:|--:|--:|",
            f"| visual tokens | {s['visual_tokens']} | {s['kept']} | {1 - fraction:.1%} |",
            f"| LLM prefill length | {s['prefill_length_unpruned']} | {s['prefill_length_pruned']} "
            f"| {1 - s['prefill_length_pruned'] / s['prefill_length_unpruned']:.1%} |",
            f"| visual-token FLOPs | {format_flops(s['visual_flops_unpruned'])} | "
            f"{format_flops(s['visual_flops_pruned'])} | {s['visual_flops_saved']:.1%} |",
            f"| whole-prefill FLOPs | {format_flops(s['prefill_flops_unpruned'])} | "
            f"{format_flops(s['prefill_flops_pruned'])} | {s['prefill_flops_saved']:.1%} |",
            f"| measured prefill | {s['prefill_seconds_unpruned'] * 1e3:.1f} ms "
            f"| {s['prefill_seconds_pruned'] * 1e3:.1f} ms | **{s['speedup']:.2f}x** |",
            "",
            f"FLOPs: FastV's `4nd² + 2n²d + 2ndm` per LLM layer (n = visual tokens, or the whole prompt). "
            f"Prefill: median of {s['timing_repeats']} forward passes on {s['device']}, vision tower included. "
            f"Vote threshold: {s['min_votes']}.",
            *([TINY_PREFILL_NOTE] if s["random_weights"] else []),
        ]
    )


def model_banner(demo: DemoModel) -> str:
    if demo.random_weights:
        name, geometry = TINY_FAMILIES[demo.family]
        return (
            f"⚠️ **Built-in {name} with RANDOM weights** ({geometry}). "
            "The pruning, the counts and the timings are real; the cue maps and answers are noise, not a "
            f"trained model's. Start the app with `--model` or `{MODEL_ENV}` for a real model."
        )
    return f"Model: **{demo.name}** on {demo.device}."


def example_images() -> list[list[str]]:
    """A few images that ship with matplotlib (its sample data), never downloaded."""
    folder = Path(matplotlib.get_data_path()) / "sample_data"
    return [[str(folder / name), question] for name, question in EXAMPLE_QUESTIONS.items() if (folder / name).exists()]


# ----------------------------------------------------------------------------- the page


CSS = """
#banner {border-left: 4px solid #f59e0b; padding: 6px 12px; background: rgba(245, 158, 11, 0.08); border-radius: 6px}
.panel img {object-fit: contain}
#stats table {font-size: 0.92em}
footer {display: none !important}
"""

PANEL_TITLES = {
    "original": "Original (hatched: cropped away)",
    "attention": "[CLS] attention alone",
    "uniqueness": "Uniqueness alone",
    "relevance": "Relevance alone",
    "mfpruner": "MFPruner (vote)",
}
ANYRES_NOTE = (
    "\n\nLLaVA-NeXT sees each image twice: as a high-res grid of tiles (the large map) and as one base "
    "tile of the whole image (the small map on the right). One budget covers the tokens of both maps; "
    "the row-newline tokens that close each grid row are always kept and not drawn."
)
HEATMAP_TITLES = {**{name: f"{CUE_TITLES[name]} score" for name in CUE_TITLES}, "votes": "votes"}


def result_image(label: str, elem_id: str) -> gr.Image:
    return gr.Image(
        label=label, type="pil", format="png", interactive=False, height=260, elem_id=elem_id,
        elem_classes="panel", buttons=["fullscreen"],
    )


def build_demo(demo: DemoModel, delete_cache: tuple[int, int] = CACHE_CLEANUP) -> gr.Blocks:
    """delete_cache: (every s, older than s) for Gradio's files of this page (see CACHE_CLEANUP)."""
    default_count = visual_token_count(demo, Image.new("RGB", (448, 448), (128, 128, 128)))
    config_budget = demo.model.config.visual_token_budget or max(1, default_count // 9)
    with gr.Blocks(title="MFPruner: which visual tokens survive", delete_cache=delete_cache) as page:
        gr.Markdown(
            "# MFPruner: which visual tokens survive\n"
            "Training-free visual-token pruning: three cues — the vision tower's [CLS] attention, token "
            "uniqueness and relevance to your question — vote on the visual tokens; the language model "
            "prefills only the kept ones. Upload a picture, ask a question, slide the budget."
        )
        gr.Markdown(model_banner(demo), elem_id="banner")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(
                    label="Image", type="filepath", image_mode=None, height=300, elem_id="image",
                    sources=["upload", "clipboard"],
                )
                question = gr.Textbox(label="Question", value="What is in the image?", lines=2, elem_id="question")
                gr.Examples(
                    example_images(), inputs=[image, question], api_visibility="private",
                    label="Examples (matplotlib sample data)",
                )
            with gr.Column(scale=2):
                budget_mode = gr.Radio(
                    [("Token count", "tokens"), ("Keep ratio", "ratio")], value="tokens", label="Budget",
                    elem_id="budget-mode",
                )
                budget = gr.Slider(
                    1, default_count, value=min(config_budget, default_count), step=1, precision=0,
                    label=f"Visual tokens kept (of {default_count})", elem_id="budget",
                )
                ratio = gr.Slider(
                    0.01, 1.0, value=demo.model.config.visual_token_ratio or 0.111, step=0.001,
                    label="Fraction of visual tokens kept", visible=False,
                    elem_id="ratio",
                )
                min_votes = gr.Slider(
                    1, len(CUE_TITLES), value=demo.model.config.min_votes, step=1, precision=0,
                    label="Vote threshold (cues that must agree)", elem_id="min-votes",
                )
                generate_answer = gr.Checkbox(
                    label=f"Also generate the answer (pruned and unpruned, {MAX_NEW_TOKENS} tokens max)",
                    value=False, elem_id="generate",
                )
                run = gr.Button("Prune and prefill", variant="primary", elem_id="run")
            with gr.Column(scale=3):
                stats = gr.Markdown("### Upload an image and press *Prune and prefill*", label="Summary", elem_id="stats")
                answer = gr.Textbox(
                    label="Answer", lines=4, interactive=False, elem_id="answer",
                    placeholder="Tick 'Also generate the answer' to compare the answers with and without pruning.",
                )
        gr.Markdown(
            "### The tokens each cue alone keeps at the same budget, and what the vote keeps (pruned patches dimmed)"
            + (ANYRES_NOTE if demo.family == "llava_next" else "")
        )
        with gr.Row(equal_height=True):
            panels = {name: result_image(title, f"panel-{name}") for name, title in PANEL_TITLES.items()}
        with gr.Row(equal_height=True):
            gr.Markdown(
                f"### Scores per token\nEach cue's score, colour-mapped (`{HEATMAP_CMAP}`: dark = low, "
                "bright = high; min-max per image) and blended over the image.\n\n"
                "**Votes**: how many cues put the token in their top-k (dark = 0, bright = 3); the vote keeps "
                "tokens at or above the threshold first, then fills by the summed score.",
                elem_id="legend",
            )
            heatmaps = {name: result_image(title, f"heatmap-{name}") for name, title in HEATMAP_TITLES.items()}
        with gr.Accordion("Details (JSON)", open=False):
            details = gr.JSON(label="Details", elem_id="details")

        inputs = [image, question, budget_mode, budget, ratio, min_votes, generate_answer]
        outputs = [*panels.values(), *heatmaps.values(), stats, details, answer]

        # The image events take the raw upload (preprocess=False) and open the file themselves:
        # gr.Image's own preprocessing would fail on a corrupt file before a clear message.
        @gpu
        def prune_and_prefill(
            image, question, budget_mode, budget, ratio, min_votes, generate_answer, progress=gr.Progress()
        ):
            """Prunes the image's visual tokens, prefills pruned and unpruned, draws and counts."""
            try:
                result = analyze(
                    demo, upload_path(image), question, budget_mode, budget, ratio, min_votes, generate_answer, progress
                )
            except ValueError as error:
                raise gr.Error(str(error), print_exception=False)
            except Exception as error:  # a bug or an out-of-memory: say so and keep serving
                logger.exception("demo run failed")
                raise gr.Error(f"The run failed ({type(error).__name__}: {error}). Try another image or setting.")
            for note in result.notes:
                gr.Warning(note)
            images = [result.panels.get(name) for name in PANEL_TITLES]
            images += [result.heatmaps.get(name) for name in HEATMAP_TITLES]
            return *images, stats_markdown(result.stats), result.stats, result.answer or ""

        def token_count_for(image, current):
            """Helper: the slider's range follows the image's real visual-token count."""
            if image is None:
                return gr.skip()
            try:
                count = visual_token_count(demo, load_image(upload_path(image))[0])
            except ValueError:  # reported when the run starts
                return gr.skip()
            update = {"maximum": count, "label": f"Visual tokens kept (of {count})"}
            if current > count:  # else the value stays: the user may be moving the slider right now
                update["value"] = count
            return gr.Slider(**update)

        def show_budget_mode(mode):
            return gr.Slider(visible=mode == "tokens"), gr.Slider(visible=mode == "ratio")

        run.click(
            prune_and_prefill, inputs, outputs, api_name="prune", preprocess=False,
            concurrency_limit=1, concurrency_id="model",
        )
        for slider in (budget, ratio, min_votes):
            slider.release(
                prune_and_prefill, inputs, outputs, api_visibility="private", trigger_mode="always_last",
                preprocess=False, concurrency_limit=1, concurrency_id="model",
            )
        image.change(token_count_for, [image, budget], budget, api_visibility="private", preprocess=False)
        budget_mode.change(
            show_budget_mode, budget_mode, [budget, ratio], api_visibility="private", queue=False
        )
    return page


def launch(page: gr.Blocks, host: str, port: int | None, **kwargs):
    theme = gr.themes.Default(primary_hue="indigo")
    return page.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, ssr_mode=False, css=CSS, theme=theme, **kwargs
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description="MFPruner demo (Gradio)")
    parser.add_argument(
        "--model", default=os.environ.get(MODEL_ENV),
        help=f"hub id or local MFPruner repo (default: ${MODEL_ENV}, else the tiny random-weights model)",
    )
    parser.add_argument(
        "--tiny", choices=sorted(TINY_FAMILIES), default="llava",
        help="without --model: the family of the built-in tiny random-weights model (default: llava, LLaVA-1.5)",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    launch(build_demo(load_model(args.model, tiny=args.tiny)), args.host, args.port)


if __name__ == "__main__":
    main()
