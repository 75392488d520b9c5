"""Turns a stock checkpoint into a complete, hub-ready MFPruner model repository.

    python -m tools.export BASE OUT [--budget N | --ratio R] [--clip-text PATH_OR_ID]
                           [--allow-download] [--overwrite] [--push-to-hub REPO_ID]

BASE: a local folder, or a hub id with --allow-download (nothing is downloaded otherwise), of a
model type in ARCHITECTURES: LLaVA-1.5 (`llava`), LLaVA-NeXT (`llava_next`), Qwen2.5-VL (`qwen2_5_vl`),
Qwen3-VL (`qwen3_vl`), Qwen3-VL MoE (`qwen3_vl_moe`), Qwen3.5 (`qwen3_5`), Qwen3.5 MoE (`qwen3_5_moe`).
OUT gets, written in a temporary folder next to it and renamed into place only when complete:
  - the weights as safetensors, sharded as BASE is. Shard files are copied byte for byte, in
    the stock key layout: the MFPruner class registers the stock conversion mapping, which
    loads that layout bit-identically, so the copy is exact by construction, the hub's storage
    deduplicates it against BASE, and the conversion never holds more than one shard in RAM
    (none at all for safetensors: the bytes are streamed; .bin shards are converted one by one);
  - config.json: BASE's config as the MFPruner config (budget / ratio, clip_text_config) with
    auto_map for AutoConfig, AutoModel, AutoModelForImageTextToText, the other Auto classes the stock
    config maps (Qwen3.5: the text-only model, the classification heads) (+ AutoProcessor with CLIP);
  - the custom code files, flat; BASE's processor / tokenizer / generation files;
  - with --clip-text: the CLIP text tower and the vision `visual_projection` of the CLIP
    checkpoint the vision tower came from (one extra shard), and the MFPruner processor that
    adds the CLIP tokenizer's segments of the instruction to the processor's outputs;
  - README.md: a model card with the hub's metadata and a usage snippet.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the shipped model code is flat top-level files of the repo
    sys.path.insert(0, str(ROOT))

from mfpruner_lib.cli import ArgumentParser, local_folder, refusals_as_errors  # noqa: E402
from mfpruner_lib.families import FAMILIES, Architecture, by_model_type  # noqa: E402
from mfpruner_pipeline import auto_map_entries  # noqa: E402


# ----------------------------------------------------------------------------- supported models


# model_type of the base config -> the family's export row (mfpruner_lib.families: add a family there).
ARCHITECTURES = {family.model_type: family.export for family in FAMILIES.values()}

CLIP_PATCH_KEY = "vision_model.embeddings.patch_embedding.weight"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".ckpt", ".pt", ".pth", ".gguf", ".onnx")
NOT_COPIED = {"config.json", "README.md"}  # written anew
DOWNLOAD_PATTERNS = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "README.md", "LICENSE*"]


def import_object(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def architecture_for(model_type: str, base: Path) -> Architecture:
    if model_type not in ARCHITECTURES and str(model_type).startswith("mfpruner"):
        raise ValueError(f"BASE {str(base)!r} is already an MFPruner repo ({model_type!r}); export from its stock checkpoint")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"BASE {str(base)!r} is a {model_type!r} checkpoint; the export supports model_type "
            f"{sorted(ARCHITECTURES)} (add a family to mfpruner_lib.families for a new MFPruner class)"
        )
    return ARCHITECTURES[model_type]


def budget_for_small_model(config, model_type: str) -> dict:
    """{} for a model whose default budget prunes; else (a small model, e.g. a tiny test repo of 36
    visual tokens under LLaVA-1.5's default 64) the default's share of the real model's tokens as a
    ratio: a default call must prune something."""
    family = by_model_type(model_type)
    if config.visual_token_budget is None or family.anyres or family.real_models[0].image_hw is not None:
        return {}  # a ratio, or a token count that varies with the image
    tokens = family.geometry(config).visual_tokens
    if config.visual_token_budget < tokens:
        return {}
    real_tokens = family.geometry(family.real_models[0].config()).visual_tokens
    ratio = round(config.visual_token_budget / real_tokens, 3)  # the card states it
    return {"visual_token_ratio": ratio, "visual_token_budget": None}


# ----------------------------------------------------------------------------- inputs


def resolve_checkpoint(name: str, allow_download: bool, what: str) -> tuple[Path, str | None]:
    """A local folder, or a hub snapshot when downloads are allowed. Returns (folder, hub id or None)."""
    folder = local_folder(name, what)
    if folder is not None:
        return folder, None
    if not allow_download:
        raise ValueError(f"{what} folder {name!r} does not exist; to download the hub repo {name!r} pass --allow-download")
    files = HfApi().list_repo_files(name)
    weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
    return Path(snapshot_download(name, allow_patterns=DOWNLOAD_PATTERNS + weights)), name


def check_inside(path: Path, folder: Path, what: str) -> None:
    """A file a checkpoint folder names must lie inside it, through symlinks too: an index naming
    `../x` or `/x`, or a link to a file elsewhere, would copy that file into OUT (and to the hub).
    In a hub cache snapshot (`models--A--B/snapshots/REV`) the files are links into the repo's
    `blobs` folder, which is allowed."""
    root = folder.resolve()
    allowed = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        allowed.append(root.parent.parent / "blobs")
    target = path.resolve()
    if not any(target == place or place in target.parents for place in allowed):
        raise ValueError(f"{what} resolves to {str(target)!r}, outside {str(folder)!r}: a checkpoint's files must lie inside its folder")


def read_json(path: Path) -> dict:
    """A JSON object from a file; a ValueError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def weight_shards(folder: Path) -> tuple[list[Path], dict]:
    """The checkpoint's weight files in shard order, and its index metadata ({} if unsharded)."""
    for stem in ("model.safetensors", "pytorch_model.bin"):
        index = folder / f"{stem}.index.json"
        if index.is_file():
            data = read_json(index)
            if not isinstance(data.get("weight_map"), dict) or not all(isinstance(n, str) for n in data["weight_map"].values()):
                raise ValueError(f"{index}: no \"weight_map\" of tensor name -> shard file name")
            names = sorted(set(data["weight_map"].values()))
            for name in names:
                check_inside(folder / name, folder, f"{index}: the weight_map's shard {name!r}")
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise ValueError(f"{folder}: the index {index.name} names missing shards {missing}")
            return [folder / n for n in names], data.get("metadata", {})
        if (folder / stem).is_file():
            check_inside(folder / stem, folder, str(folder / stem))
            return [folder / stem], {}
    raise ValueError(f"{folder} holds no weights (model.safetensors, pytorch_model.bin, or their .index.json)")


MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; the safetensors library refuses larger headers too
# bits per element of each safetensors dtype (a tensor's bytes: elements x bits / 8)
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64, "F64": 64,
}


def safetensors_sizes(shard: Path) -> dict[str, int]:
    """{key: bytes} from a safetensors file's header, without reading any tensor. Checks the file
    first: an 8-byte header length (capped), a JSON header, each tensor's byte range inside the
    file and as long as its dtype and shape say, the ranges tiling the data exactly. A ValueError
    names the file and what is wrong (a truncated copy, a cut download, not safetensors)."""

    def bad(reason: str) -> ValueError:
        return ValueError(f"{shard}: not a complete safetensors file: {reason}")

    size = shard.stat().st_size
    with open(shard, "rb") as f:
        if size < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        header_length = int.from_bytes(f.read(8), "little")
        if header_length > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise bad(f"header length {header_length} exceeds the file ({size} bytes) or the {MAX_SAFETENSORS_HEADER}-byte cap")
        try:
            header = json.loads(f.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise bad(f"its header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    data_size, ranges = size - 8 - header_length, []
    for key, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise bad(f"tensor {key!r} has no valid data_offsets / shape in the header")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise bad(f"tensor {key!r} spans bytes {begin}..{end} but the data section has {data_size} bytes (truncated?)")
        bits = SAFETENSORS_DTYPE_BITS.get(entry.get("dtype"))
        if bits is not None and math.prod(shape) * bits != (end - begin) * 8:
            raise bad(f"tensor {key!r} ({entry['dtype']} {shape}) needs {math.prod(shape) * bits / 8:g} bytes, its range has {end - begin}")
        ranges.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(ranges):
        if begin != position:
            raise bad(f"tensor {key!r} starts at byte {begin} of the data, expected {position} (a gap or an overlap)")
        position = end
    if position != data_size:
        raise bad(f"the tensors cover {position} bytes but the data section has {data_size} (trailing bytes)")
    return {key: end - begin for begin, end, key in ranges}


def load_bin(shard: Path) -> dict[str, torch.Tensor]:
    """A .bin shard, memory-mapped where the file format allows it; a ValueError names a broken file."""
    try:
        try:
            return torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            return torch.load(shard, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for broken files
        raise ValueError(f"{shard}: cannot be read as a PyTorch weights file ({type(error).__name__}: {error})") from None


def read_tensor(shards: list[Path], pattern: str) -> torch.Tensor | None:
    """The first tensor whose key matches `pattern`, read alone from its shard."""
    for shard in shards:
        if shard.suffix == ".safetensors":
            with safe_open(shard, "pt") as f:
                for key in f.keys():
                    if re.search(pattern, key):
                        return f.get_tensor(key)
        else:
            state = load_bin(shard)
            for key, value in state.items():
                if re.search(pattern, key):
                    return value.clone()
    return None


# ----------------------------------------------------------------------------- CLIP text tower


def clip_text_parts(clip: Path, base_shards: list[Path], base_vision_config, arch: Architecture):
    """Checks the CLIP checkpoint against the base's vision tower and returns (clip_text_config
    dict, {MFPruner key: tensor} of the text tower and the visual projection, CLIP tokenizer)."""
    from transformers import AutoTokenizer, CLIPConfig

    if arch.processor_class is None:
        raise ValueError("--clip-text: this architecture has no CLIP text relevance cue (no processor_class)")
    config_file = clip / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--clip-text {str(clip)!r} has no config.json")
    if read_json(config_file).get("model_type") != "clip":
        raise ValueError(f"--clip-text {str(clip)!r} is not a CLIP checkpoint (model_type 'clip' with text and vision towers)")
    clip_config = CLIPConfig.from_pretrained(clip)
    vision = clip_config.vision_config
    for field in ("hidden_size", "patch_size", "image_size", "num_hidden_layers"):
        if getattr(vision, field) != getattr(base_vision_config, field):
            raise ValueError(
                f"--clip-text {str(clip)!r}: vision_config.{field} is {getattr(vision, field)} but BASE's vision "
                f"tower has {getattr(base_vision_config, field)}; give the CLIP checkpoint the vision tower came from"
            )
    shards, _ = weight_shards(clip)
    for shard in shards:
        if shard.suffix == ".safetensors":
            safetensors_sizes(shard)  # a broken file: an error naming it, not the reader's bare one
    base_patch = read_tensor(base_shards, arch.vision_patch_key)
    clip_patch = read_tensor(shards, re.escape(CLIP_PATCH_KEY) + "$")
    if base_patch is None or clip_patch is None or not torch.equal(clip_patch.to(base_patch.dtype), base_patch):
        raise ValueError(
            f"--clip-text {str(clip)!r}: its vision weights differ from BASE's vision tower (patch embedding); "
            "give the CLIP checkpoint the vision tower came from (openai/clip-vit-large-patch14-336 for LLaVA-1.5)"
        )

    tensors = {}
    for shard in shards:  # only the text tower and the two projections are kept: a few hundred MB for ViT-L
        if shard.suffix == ".safetensors":
            with safe_open(shard, "pt") as f:
                for key in f.keys():
                    if (name := clip_key_to_mfpruner(key)) is not None:
                        tensors[name] = f.get_tensor(key)
        else:
            for key, value in load_bin(shard).items():
                if (name := clip_key_to_mfpruner(key)) is not None:
                    tensors[name] = value.clone()
    tensors = {k: v.to(base_patch.dtype).contiguous() for k, v in tensors.items()}
    expected = {"clip_visual_projection.weight", "clip_text_model.text_projection.weight"}
    if not expected <= set(tensors):
        raise ValueError(f"--clip-text {str(clip)!r} lacks {sorted(expected - set(tensors))} (needs a full CLIPModel checkpoint)")

    text_config = clip_config.text_config.to_dict()
    text_config["projection_dim"] = clip_config.projection_dim  # CLIPModel keeps it on the top config
    for key in ("_name_or_path", "architectures", "transformers_version", "id2label", "label2id"):
        text_config.pop(key, None)
    tokenizer = AutoTokenizer.from_pretrained(clip)
    return text_config, tensors, tokenizer


def clip_key_to_mfpruner(key: str) -> str | None:
    """CLIPModel key -> the MFPruner model's key (None: not needed)."""
    if key.startswith(("text_model.", "text_projection.")):
        return "clip_text_model." + key
    if key == "visual_projection.weight":
        return "clip_visual_projection.weight"
    return None


# ----------------------------------------------------------------------------- outputs


def shard_name(i: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def write_weights(
    shards: list[Path], sizes: dict[Path, dict[str, int]], metadata: dict, extra: dict[str, torch.Tensor], out: Path,
    progress: bool = False,
) -> list[str]:
    """Writes BASE's shards (+ one shard of extra tensors) as safetensors, one shard at a time.
    sizes: {safetensors shard: its tensors' byte sizes}, from `safetensors_sizes` (checked files)."""
    count = len(shards) + (1 if extra else 0)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        target = out / shard_name(i, count)
        if shard.suffix == ".safetensors":
            copy_file(shard, target, f"shard {i + 1}/{count}" if progress else None)  # the tensors never enter Python
            keys = list(sizes[shard])
            total += sum(sizes[shard].values())
        else:
            state = without_shared_memory(load_bin(shard))
            save_file(state, target, metadata={"format": "pt"})
            keys = list(state)
            total += sum(v.numel() * v.element_size() for v in state.values())
            del state
            if progress:
                print(f"shard {i + 1}/{count} {target.name}: converted from {shard.name}", file=sys.stderr, flush=True)
        weight_map.update({key: target.name for key in keys})
    if extra:
        target = out / shard_name(count - 1, count)
        save_file(extra, target, metadata={"format": "pt"})
        weight_map.update({key: target.name for key in extra})
        total += sum(v.numel() * v.element_size() for v in extra.values())
    if count > 1:
        index = {"metadata": {**metadata, "total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sorted(set(weight_map.values()))


COPY_CHUNK = 64 * 2**20


def copy_file(source: Path, target: Path, progress_label: str | None = None) -> None:
    """Copies a file in 64 MB chunks; with a label, the bytes copied so far on stderr (one
    updating line per file: a multi-GB shard takes a while)."""
    total, copied = source.stat().st_size, 0
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(COPY_CHUNK):
            writer.write(chunk)
            copied += len(chunk)
            if progress_label:
                print(f"\r{progress_label} {target.name}: {copied / 2**20:,.1f} / {total / 2**20:,.1f} MB", end="", file=sys.stderr, flush=True)
    if progress_label:
        print(file=sys.stderr, flush=True)
    if copied != total:
        raise ValueError(f"{source}: changed size while being copied ({total} -> {copied} bytes)")


def without_shared_memory(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights in a .bin): copy the later ones."""
    seen, result = set(), {}
    for key, value in state.items():
        storage = value.untyped_storage().data_ptr()
        result[key] = value.clone() if storage in seen else value.contiguous()
        seen.add(storage)
    return result


def mfpruner_config(base: Path, arch: Architecture, settings: dict, clip_text_config: dict | None):
    from transformers import AutoConfig

    config_class = import_object(arch.config_class)
    try:
        stock = AutoConfig.from_pretrained(base).to_dict()
    except (TypeError, ValueError, KeyError, StrictDataclassError) as error:  # a field of the wrong type or shape
        raise ValueError(f"{base / 'config.json'}: not a valid {arch.family} config ({type(error).__name__}: {error})") from None
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        stock.pop(key, None)
    config = config_class(**stock, **settings, clip_text_config=clip_text_config)
    model_class = import_object(arch.model_class)
    config.architectures = [model_class.__name__]
    config.auto_map = {"AutoConfig": arch.config_class, **auto_map_entries(model_class)}
    if clip_text_config is not None:
        config.auto_map["AutoProcessor"] = arch.processor_class
    return config


def code_files(arch: Architecture, with_processor: bool) -> list[Path]:
    """The shipped modules and everything they import relatively, flat."""
    from transformers.dynamic_module_utils import get_relative_import_files

    modules = [arch.config_class, arch.model_class] + ([arch.processor_class] if with_processor else [])
    files = []
    for entry in modules:
        file = ROOT / f"{entry.rsplit('.', 1)[0]}.py"
        for path in [file, *map(Path, get_relative_import_files(file))]:
            if path not in files:
                files.append(path)
    return files


def copy_base_files(base: Path, out: Path) -> None:
    """BASE's processor, tokenizer, generation and licence files (everything but weights,
    config.json and README.md); hidden files and folders (e.g. a download cache) are skipped."""
    for path in sorted(base.rglob("*")):
        relative = path.relative_to(base)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if relative.name.endswith(WEIGHT_SUFFIXES) or relative.name.endswith(".index.json") or str(relative) in NOT_COPIED:
            continue
        check_inside(path, base, str(path))
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / relative)


def write_clip_processor(base: Path, arch: Architecture, clip_tokenizer, window: int, out: Path) -> None:
    from transformers import AutoProcessor

    processor_class = import_object(arch.processor_class)
    stock = AutoProcessor.from_pretrained(base)
    extra = {k: getattr(stock, k) for k in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens") if hasattr(stock, k)}
    processor = processor_class(
        stock.image_processor,
        stock.tokenizer,
        clip_tokenizer,
        chat_template=stock.chat_template,
        clip_text_window=window,
        **extra,
    )
    for tokenizer in (processor.tokenizer, processor.clip_tokenizer):  # loading artefacts, not settings
        for key in ("local_files_only", "is_local"):
            tokenizer.init_kwargs.pop(key, None)
    processor.save_pretrained(out)


def base_model_id(base: Path, hub_id: str | None, given: str | None) -> str | None:
    """The hub id of BASE: --base-model-id, the downloaded id, or a hub cache snapshot's name."""
    if given:
        return given
    if hub_id:
        return hub_id
    match = re.search(r"models--([^/]+)--([^/]+)/snapshots/", str(base.resolve()))
    return f"{match.group(1)}/{match.group(2)}" if match else None


def base_license(base: Path) -> str | None:
    card = base / "README.md"
    if card.is_file():
        return ModelCard.load(card).data.to_dict().get("license")
    return None


def model_card(arch: Architecture, config, base_id: str, license: str, repo_id: str, has_clip: bool) -> ModelCard:
    budget = (
        f"keeps {config.visual_token_budget} visual tokens per image"
        if config.visual_token_budget is not None
        else f"keeps {config.visual_token_ratio:.1%} of each image's visual tokens"
    )
    relevance = (
        "a CLIP text tower (the same CLIP as the vision tower) embeds the instruction, as in the paper; "
        "the processor finds the instruction (an `instruction=` argument, else the last user turn of the "
        "chat or prompt) and returns `clip_input_ids` / `clip_attention_mask`"
        if has_clip
        else "relevance to the instruction in the language model's embedding space (no CLIP text tower in this repo)"
    )
    note = f"\n{arch.processor_note}\n" if arch.processor_note else ""
    data = ModelCardData(
        base_model=base_id,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license,
        tags=["mfpruner", "token-pruning", "visual-token-pruning", "custom_code", *arch.tags],
    )
    body = f"""
# MFPruner: {base_id}

[{base_id}](https://huggingface.co/{base_id}) ({arch.family}) with MFPruner, training-free visual-token pruning
("Rethinking Attention Cues: Multi-Factor Guided Token Pruning for Efficient Vision-Language
Understanding"). The weights are the base model's, unchanged. Before the language model runs,
each image's visual tokens are ranked by three cues ({arch.attention_cue}, token
uniqueness, relevance to the instruction), the tokens at least two cues put in their top-k are
kept, and the budget is filled by the summed score: the language model prefills far fewer tokens.

This repo {budget} by default. Relevance: {relevance}.

## Usage
{note}
```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

repo = "{repo_id}"
image = Image.open("photo.jpg")
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is shown?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64)                              # the default budget
out = model.generate(**inputs, max_new_tokens=64, {arch.per_call_setting})     # per call
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
print(model.last_pruning.keep_indices)  # the kept visual tokens of each image
```

`generate()` returns the prompt followed by the new tokens, like the base model.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    """Uploads the finished folder with huggingface_hub (the only network access of the tool)."""
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="MFPruner export")
    return repo_id


# ----------------------------------------------------------------------------- the export


def export(
    base: str,
    out: str,
    *,
    budget: int | None = None,
    ratio: float | None = None,
    clip_text: str | None = None,
    allow_download: bool = False,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    base_model: str | None = None,
    license: str | None = None,
    progress: bool | None = None,
) -> Path:
    """Writes the MFPruner repo for `base` to `out` (see the module docstring). Returns `out`.
    progress: print the bytes copied per shard on stderr (None: when stderr is a terminal)."""
    out = Path(out).expanduser()
    progress = sys.stderr.isatty() if progress is None else progress
    if budget is not None and ratio is not None:
        raise ValueError(f"give only one of --budget and --ratio (got {budget} and {ratio})")
    check_out_folder(out)
    if Path(base).expanduser().is_dir():  # a local BASE: its relation to OUT first, --overwrite or not
        check_apart(out, {"BASE": Path(base).expanduser()})
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"OUT {str(out)!r} exists and is not empty; pass --overwrite to replace it")
    base_dir, hub_id = resolve_checkpoint(base, allow_download, "BASE")
    check_apart(out, {"BASE": base_dir})  # a downloaded snapshot too
    if not (base_dir / "config.json").is_file():
        raise ValueError(f"BASE {base!r} has no config.json: not a transformers checkpoint")
    model_type = read_json(base_dir / "config.json").get("model_type")
    arch = architecture_for(model_type, base_dir)
    if clip_text is not None and arch.processor_class is None:
        raise ValueError(
            f"--clip-text: {arch.family} ({model_type!r}) has no CLIP text tower to add (its vision tower is not "
            "CLIP); its relevance cue uses the language model's embeddings. Export without --clip-text"
        )
    base_id = base_model_id(base_dir, hub_id, base_model)
    if push_to_hub and base_id is None:
        raise ValueError("--push-to-hub needs the base model's hub id for the card: pass --base-model-id")
    base_id = base_id or base_dir.name
    shards, metadata = weight_shards(base_dir)
    sizes = {shard: safetensors_sizes(shard) for shard in shards if shard.suffix == ".safetensors"}  # checks each file
    settings = {"visual_token_budget": budget} if budget is not None else {}
    settings = {"visual_token_ratio": ratio, "visual_token_budget": None} if ratio is not None else settings
    # fail on bad settings before anything is written
    config = mfpruner_config(base_dir, arch, settings, None)
    if not settings and (small := budget_for_small_model(config, model_type)):
        settings = small
        config = mfpruner_config(base_dir, arch, settings, None)

    clip_tensors, clip_tokenizer, clip_text_config = {}, None, None
    if clip_text is not None:
        clip_dir, _ = resolve_checkpoint(clip_text, allow_download, "--clip-text")
        check_apart(out, {"--clip-text": clip_dir})
        clip_text_config, clip_tensors, clip_tokenizer = clip_text_parts(clip_dir, shards, config.vision_config, arch)
        config = mfpruner_config(base_dir, arch, settings, clip_text_config)

    with staged_folder(out) as staging:
        copy_base_files(base_dir, staging)
        write_weights(shards, sizes, metadata, clip_tensors, staging, progress)
        del clip_tensors
        config.to_json_file(staging / "config.json")
        for file in code_files(arch, with_processor=clip_tokenizer is not None):
            shutil.copyfile(file, staging / file.name)
        if clip_tokenizer is not None:
            write_clip_processor(base_dir, arch, clip_tokenizer, clip_text_config["max_position_embeddings"], staging)
        license = license or base_license(base_dir) or "unknown"
        repo_id = push_to_hub or f"your-name/{out.name}"
        model_card(arch, config, base_id, license, repo_id, clip_tokenizer is not None).save(staging / "README.md")
    if push_to_hub:
        push_folder(out, push_to_hub, private)
    return out


def check_out_folder(out: Path, what: str = "OUT") -> None:
    """OUT must be a folder (or absent) whose parents are folders, and neither the current folder
    nor one above it: OUT is replaced by a rename, which would leave the shell in a deleted folder."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {str(out)!r} is a file; give a folder")
    for parent in out.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{what} {str(out)!r}: its parent {str(parent)!r} is a file, not a folder")
    here, target = Path.cwd().resolve(), out.resolve()
    if target == here or target in here.parents:
        where = "is" if target == here else "contains"
        raise ValueError(f"{what} {str(out)!r} {where} the current folder ({str(here)!r}); give a folder beside it")


@contextmanager
def staged_folder(out: Path):
    """Yields a new staging folder next to `out` (`.OUT.partial-PID-*`); when the block ends
    without an error it becomes `out` (an old `out` is removed only after the rename), else it is
    removed, on Ctrl-C and SIGTERM too. Staging folders of killed runs are removed first."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    with sigterm_as_interrupt():
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        try:
            yield staging
            for path in [staging, *staging.rglob("*")]:  # mkdtemp and save_file create owner-only modes
                path.chmod(0o755 if path.is_dir() else 0o644)
            replace_folder(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def check_apart(out: Path, inputs: dict[str, Path]) -> None:
    """OUT is replaced as a whole (--overwrite) and its staging folder is written next to it, so it
    must not be an input folder, lie inside one, or contain one; compared through symlinks."""
    target = out.resolve()
    for what, folder in inputs.items():
        source = folder.resolve()
        if target == source:
            raise ValueError(f"OUT {str(out)!r} is {what} ({str(folder)!r}); give another folder: {what} is never modified")
        if source in target.parents:
            raise ValueError(f"OUT {str(out)!r} lies inside {what} ({str(folder)!r}); give a folder outside it: {what} is never modified")
        if target in source.parents:
            raise ValueError(f"OUT {str(out)!r} contains {what} ({str(folder)!r}); replacing OUT would delete it: give another folder")


def staging_owner(folder: Path, out: Path) -> int | None:
    """The process id in a staging (`.OUT.partial-PID-*`) or replaced (`.OUT.old-PID-*`) folder's name."""
    for kind in ("partial", "old"):
        prefix = f".{out.name}.{kind}-"
        if folder.name.startswith(prefix) and (pid := folder.name[len(prefix):].split("-", 1)[0]).isdigit():
            return int(pid)
    return None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_staging(out: Path) -> None:
    """Removes the staging folders of exports to OUT whose process is gone (killed with SIGKILL,
    a power cut): each holds a partial copy of the weights."""
    if os.name != "posix":  # os.kill(pid, 0) terminates the process on Windows
        return
    for folder in out.parent.iterdir():
        pid = staging_owner(folder, out)
        if pid is not None and pid != os.getpid() and folder.is_dir() and not process_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same clean-up runs."""


@contextmanager
def sigterm_as_interrupt():
    """While the staging folder exists, SIGTERM (`kill`, a job scheduler, a container stop) raises
    `Terminated`, so the folder is removed as on Ctrl-C. Only where Python allows signal handlers
    (the main thread) and nobody else installed one."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def replace_folder(staging: Path, out: Path) -> None:
    """Moves the finished staging folder to `out`; an old `out` is removed only after the move."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


@refusals_as_errors
def main(argv=None):
    parser = ArgumentParser(prog="python -m tools.export", description=__doc__.splitlines()[0])
    parser.add_argument("base", metavar="BASE", help="stock checkpoint folder (or hub id with --allow-download)")
    parser.add_argument("out", metavar="OUT", help="output folder (must be empty or absent unless --overwrite)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--budget", type=int, help="default visual tokens kept per image (default: the family's, e.g. 64 for LLaVA-1.5)")
    group.add_argument("--ratio", type=float, help="default fraction of each image's visual tokens kept (LLaVA-NeXT, Qwen2.5-VL: 0.222)")
    parser.add_argument("--clip-text", metavar="PATH_OR_ID", help="CLIP checkpoint of the vision tower: adds its text tower")
    parser.add_argument("--allow-download", action="store_true", help="BASE / --clip-text may be hub ids to download")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload OUT to this hub repo when done")
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    parser.add_argument("--base-model-id", help="hub id of BASE for the card's base_model (when BASE is a folder)")
    parser.add_argument("--license", help="the card's license (default: BASE's card, else 'unknown')")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="print the bytes copied per shard (default: when stderr is a terminal)",
    )
    args = parser.parse_args(argv)
    try:
        out = export(
            args.base,
            args.out,
            budget=args.budget,
            ratio=args.ratio,
            clip_text=args.clip_text,
            allow_download=args.allow_download,
            overwrite=args.overwrite,
            push_to_hub=args.push_to_hub,
            private=args.private,
            base_model=args.base_model_id,
            license=args.license,
            progress=args.progress,
        )
    except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM: the staging folder is already removed
        parser.exit(143 if isinstance(error, Terminated) else 130, "interrupted\n")
    print(out)


if __name__ == "__main__":
    main()
