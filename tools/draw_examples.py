"""Writes the pictures of the README and docs/visualization.md with model.draw_pruning / plot_pruning.

    python -m tools.draw_examples [--out assets/visualization]

Each family's demo tiny model (random weights, the real model's token geometry, built locally: no
download) prunes a picture that ships with matplotlib; the cue maps are therefore noise, the
geometry and the drawing are real. Written: OUT/<family>.png (plot_pruning), OUT/llava-next-base.png
(draw_pruning's base tile), OUT/qwen2.5-vl-video.png (a 4-frame video), OUT/multi-image.png (both
images of one prompt) and assets/plot_pruning.png (the README's).
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import matplotlib.cbook
import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from mfpruner_lib import tiny_models
from mfpruner_lib.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Who is the person in the picture?"
DPI = 80


def sample_image() -> Image.Image:
    return Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")  # 512 x 600


def load(key: str, folder: Path):
    """(model, processor) of the family's demo tiny model. Qwen2.5-VL's processor is its image processor
    (the inputs come from tiny_models.qwen_inputs, which also builds videos)."""
    path = FAMILIES[key].demo_tiny(folder)
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    if key == "qwen2.5-vl":
        return model, (AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path))
    return model, AutoProcessor.from_pretrained(path, trust_remote_code=True)


def prune(model, processor, images: list, videos=None, **settings):
    """One pruning forward() over a prompt holding `images` (then `videos`)."""
    if isinstance(processor, tuple):
        placeholders = "<|vision_start|><|image_pad|><|vision_end|>" * len(images)
        placeholders += "<|vision_start|><|video_pad|><|vision_end|>" * len(videos or [])
        inputs = tiny_models.qwen_inputs(*processor, [placeholders + QUESTION], images, videos)
    else:
        inputs = processor(images=images, text="<image>" * len(images) + QUESTION, return_tensors="pt")
    with torch.no_grad():
        model(**inputs, **settings)


def save(figure_or_image, path: Path, max_width: int = 1100) -> None:
    """A PNG of at most `max_width` px, in 256 adaptive colours (the pictures stay well under 300 KB)."""
    if isinstance(figure_or_image, Image.Image):
        picture = figure_or_image
    else:
        buffer = io.BytesIO()
        figure_or_image.savefig(buffer, dpi=DPI, format="png")
        picture = Image.open(buffer).convert("RGB")
    if picture.width > max_width:
        picture = picture.resize((max_width, round(picture.height * max_width / picture.width)), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(path, f"{path.stat().st_size / 1e3:.0f} KB")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.draw_examples", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "visualization")
    args = parser.parse_args(argv)
    image = sample_image()
    with tempfile.TemporaryDirectory() as folder:
        for key in FAMILIES:
            model, processor = load(key, Path(folder))
            drawing_processor = processor[1] if isinstance(processor, tuple) else processor
            prune(model, processor, [image], visual_token_ratio=0.222)
            figure = model.plot_pruning(image, processor=drawing_processor)
            save(figure, args.out / f"{key}.png")
            if key == "llava-1.5":
                save(figure, ROOT / "assets" / "plot_pruning.png")
                second = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((600, 400))
                prune(model, processor, [image, second], visual_token_budget=64)
                drawings = [model.draw_pruning(picture, processor=processor, index=i) for i, picture in enumerate((image, second))]
                save(concatenate(drawings), args.out / "multi-image.png", max_width=800)
            if key == "llava-next":
                base_tile = model.draw_pruning(image, processor=processor, base_tile=True)
                save(base_tile, args.out / "llava-next-base.png", max_width=400)
            if key == "qwen2.5-vl":  # 4 frames (2 frame pairs), the window sliding down the picture
                crops = [np.array(image.crop((0, 40 * f, 448, 40 * f + 392))) for f in range(4)]  # 448 x 392 px
                frames = torch.stack([torch.from_numpy(crop).permute(2, 0, 1) / 255.0 for crop in crops])
                prune(model, processor, [], [frames], visual_token_ratio=0.222)
                video = model.draw_pruning(frames, processor=drawing_processor, index=0)
                save(video, args.out / "qwen2.5-vl-video.png")


def concatenate(pictures: list[Image.Image], gap: int = 12) -> Image.Image:
    """Pictures side by side on white, tops aligned."""
    width = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in pictures)), "white")
    left = 0
    for picture in pictures:
        canvas.paste(picture, (left, 0))
        left += picture.width + gap
    return canvas


if __name__ == "__main__":
    main()
