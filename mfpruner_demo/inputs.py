"""The demo's input checks: an upload opened as an RGB image, the question, numbers from the API.
Each raises ValueError with a message for the user."""

from __future__ import annotations

import math
import os
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 50_000_000  # refuse larger uploads: decoding them costs seconds and gigabytes
MAX_SIDE = 2048  # downscale larger uploads; the processors resize to a few hundred px anyway
MAX_QUESTION_CHARS = 1000


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
