"""The demo's model: a hub id or local MFPruner repo, or a built-in tiny random-weights model of a
registry family (mfpruner_lib.families), with its processor."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mfpruner_lib.cli import local_folder
from mfpruner_lib.families import FAMILIES, by_model_type
from mfpruner_lib.tiny_models import qwen_inputs

MODEL_ENV = "MFPRUNER_MODEL"
# A Space folder written by `python -m tools.make_space --model REPO` names its model in this file
# beside app.py; $MFPRUNER_MODEL (a Space variable) and `--model` come first.
MODEL_FILE = "demo_model.txt"


def default_model_spec(app_folder: str | os.PathLike) -> str | None:
    """The model when `--model` is not given: $MFPRUNER_MODEL, else the line of MODEL_FILE in
    `app_folder`, else None (the built-in tiny model)."""
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV]
    path = Path(app_folder) / MODEL_FILE
    spec = path.read_text().strip() if path.is_file() else ""
    if spec and (Path(app_folder) / spec).is_dir():  # a folder inside the Space (make_space copies a local model)
        return str(Path(app_folder) / spec)
    return spec or None


@dataclass
class DemoModel:
    """The loaded model and what the page needs to know about it."""

    model: torch.nn.Module
    processor: object
    name: str
    family: str  # the registry family's model_type: "llava", "llava_next", "qwen2_5_vl"
    random_weights: bool
    device: torch.device


def model_family(config) -> str:
    """'mfpruner_llava' -> 'llava', 'mfpruner_qwen2_5_vl' -> 'qwen2_5_vl'."""
    return config.model_type.removeprefix("mfpruner_")


# `--tiny` takes a family's model_type: the built-in tiny random-weights model of each registry family.
TINY_FAMILIES = {family.model_type: family for family in FAMILIES.values()}


def build_default_model(folder: str | os.PathLike, family: str = "llava") -> Path:
    """The built-in defaults: tiny MFPruner models with random weights and the real models' token
    geometry, built locally, no download (each registry family's `demo_tiny`)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"`--tiny` must be one of {sorted(TINY_FAMILIES)}, got {family!r}")
    return TINY_FAMILIES[family].demo_tiny(Path(folder))


class QwenInputsProcessor:
    """Tokenizer + image processor in place of `Qwen2_5_VLProcessor`, for repos without a full
    processor: in transformers 5.x that processor cannot be built without torchvision (its video
    processor needs it), which CPU set-ups here lack. Images only; the placeholders are expanded
    exactly as the processor does (`mfpruner_lib.tiny_models.qwen_inputs`)."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def __call__(self, images, text: str, return_tensors: str = "pt"):
        from transformers import BatchFeature

        return BatchFeature(qwen_inputs(self.tokenizer, self.image_processor, [text], images=[images]))

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)


def load_processor(spec: str, family: str):
    """The repo's processor; for a family whose processor may not build here (Qwen2.5-VL without
    torchvision), tokenizer + image processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    stand_in = getattr(by_model_type(family), "processor_stand_in", False)
    try:
        processor = AutoProcessor.from_pretrained(spec, trust_remote_code=True)
    except (ImportError, OSError, ValueError, TypeError):
        if not stand_in:
            raise
        processor = None
    if hasattr(processor, "image_processor"):
        return processor
    if not stand_in:
        raise ValueError(f"{spec} has no image processor (AutoProcessor gave {type(processor).__name__})")
    tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=True)
    return QwenInputsProcessor(tokenizer, AutoImageProcessor.from_pretrained(spec, trust_remote_code=True))


def check_model_spec(spec: str, what: str = "--model") -> Path | None:
    """The local MFPruner repo folder `spec` names, or None for a hub id (loaded from the hub: the
    user asked for it). A ValueError naming `what` for a missing path, a file, a folder without
    config.json, and a stock checkpoint never exported (with the export command to run)."""
    folder = local_folder(spec, what)
    if folder is None:
        return None
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{what} folder {spec!r} has no config.json: not a model repo")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise ValueError(f"{config}: not a JSON object of a model config") from None
    if model_type in {f"mfpruner_{family}" for family in TINY_FAMILIES}:
        return folder
    if model_type in TINY_FAMILIES:
        command = f"python -m tools.export {shlex.quote(spec)} {shlex.quote(str(folder.absolute()) + '-mfpruner')}"
        raise ValueError(
            f"{what} {spec!r} is a stock {model_type!r} checkpoint, not an MFPruner repo; export it first "
            f"(from the MFPruner project: {command}) and give the exported folder"
        )
    raise ValueError(
        f"{what} {spec!r} is a {model_type!r} checkpoint; the demo serves MFPruner repos of "
        f"{sorted(f'mfpruner_{family}' for family in TINY_FAMILIES)}"
    )


def load_model(spec: str | None = None, tiny: str = "llava") -> DemoModel:
    """spec: a hub id or a local MFPruner repo; None builds the tiny random-weights model of the
    `tiny` family in a temporary folder, removed once the model and processor are loaded (nothing
    is read from it later), quietly: its progress bars say nothing the user can act on."""
    if spec is not None:
        check_model_spec(spec)
        return load_repo(spec, spec, random_weights=False)
    with tempfile.TemporaryDirectory(prefix="mfpruner-demo-") as folder, progress_bars_off():
        path = build_default_model(folder, tiny)
        return load_repo(str(path), f"{TINY_FAMILIES[tiny].demo_name} (random weights)", random_weights=True)


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
