"""Tiny models of every family with random weights, built locally (no download), saved as
complete folders: an MFPruner remote-code repo (config with auto_map, weights, the custom code, a
processor) or a stock checkpoint of the same family (stock=True, the export's input).

Tests, the benchmarks and the demo's default model use them. Each is its family at toy width:
  LLaVA-1.5   a CLIP vision tower on 84 px images, 14 px patches (6 x 6 = 36 visual tokens), a
              two-layer MLP projector and a small Llama (`build_tiny_llava`)
  LLaVA-NeXT  the same towers on 56 px anyres tiles, up to a 2 x 2 grid (`build_tiny_llava_next`)
  Qwen2.5-VL  4 vision blocks (windowed and full attention), 2 x 2 merge, a 2-layer M-RoPE text
              model; `qwen_inputs` stands in for its processor (`build_tiny_qwen2_5_vl`)
  Qwen3-VL    4 vision blocks with 2 DeepStack levels, 16 px patches, a 3-layer text model
              (`build_tiny_qwen3_vl`; MoE: `build_tiny_qwen3_vl_moe`)
  Qwen3.5     Qwen3-VL's tower without DeepStack, a 4-layer text model (3 linear-attention layers,
              1 full-attention layer) (`build_tiny_qwen3_5`; MoE: `build_tiny_qwen3_5_moe`)
A tiny CLIP checkpoint (the paper's text tower) and the hub's older LLaVA layout are here too, for
the export's tests. Command line: `python -m tools.build_tiny`.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

CORPUS = (
    "USER: What is in the image? ASSISTANT: A cat sits on a red sofa next to a window.\n"
    "Describe the picture in detail. How many people are there? Is there a dog? Yes. No.\n"
    "The quick brown fox jumps over the lazy dog. What color is the car? It is blue, green, white.\n"
    "0123456789 .,:;!?'\"()[]{}<>-_/\\@#$%^&*+=~` abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
)


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(
    vocab_size: int = 320,
    special_tokens: list[str] = SPECIAL_TOKENS,
    named_tokens: dict | None = None,
    chat_template: str = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few lines: any text encodes, ids are deterministic.

    special_tokens: kept whole (the first ones get ids 0, 1, ...); named_tokens: the
    tokenizer's unk/bos/eos/pad and extra special tokens (default: LLaVA's)."""
    named_tokens = named_tokens or dict(
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer = Tokenizer(models.BPE(unk_token=named_tokens.get("unk_token")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="left", **named_tokens)
    fast.chat_template = chat_template
    return fast


def tiny_clip_text_config(vocab_size: int, projection_dim: int = 16) -> dict:
    """A tiny CLIP text tower config (the paper's relevance cue), sharing the LLM tokenizer's ids."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=projection_dim,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
    ).to_dict()


def tiny_llava_config(
    vocab_size: int, image_token_id: int, *, image_size: int = 84, text_heads: int = 4,
    vision: dict | None = None, text: dict | None = None, **mfpruner
) -> "LlavaConfig":
    """vision / text: sizes that replace the toy ones (the serving benchmark's cpu size)."""
    vision = CLIPVisionConfig(**{
        **dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=16),
        **(vision or {}), "image_size": image_size, "patch_size": 14,
    })
    text = LlamaConfig(**{
        **dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=text_heads,
               num_key_value_heads=2, max_position_embeddings=512),
        **(text or {}), "vocab_size": vocab_size, "pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2,
    })
    tokens = (image_size // 14) ** 2
    kwargs = dict(vision_config=vision, text_config=text, image_token_index=image_token_id, image_seq_length=tokens)
    if mfpruner:
        from configuration_mfpruner import MFPrunerLlavaConfig

        return MFPrunerLlavaConfig(**kwargs, **mfpruner)
    return LlavaConfig(**kwargs)


def image_processor_class(name: str):
    """transformers' `<Model>ImageProcessor` (its torchvision backend), or without torchvision its
    PIL twin `<Model>ImageProcessorPil`, which the stock name falls back to anyway, with a warning
    at every start that nobody can act on (torchvision is optional here)."""
    import transformers
    from transformers.utils import is_torchvision_available

    return getattr(transformers, name if is_torchvision_available() else f"{name}Pil")


def build_tiny_llava_processor(image_size: int = 84) -> LlavaProcessor:
    tokenizer = build_tokenizer()
    image_processor = image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        num_additional_image_tokens=1,  # the [CLS] token, dropped by the "default" strategy
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
    )


def rename_to_hub_keys(state: dict, renames: list[tuple[str, str]]) -> dict:
    """A state dict with the first matching prefix rename applied to each key (hub layout)."""
    renamed = {}
    for key, tensor in state.items():
        for old, new in renames:
            if key.startswith(old) and not key.startswith(new):
                key = new + key[len(old) :]
                break
        renamed[key] = tensor
    return renamed


def to_hub_key_layout(path: Path, renames: list[tuple[str, str]]) -> None:
    """Rewrites a saved checkpoint's keys into the layout of the hub's checkpoints (prefix renames)."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    save_file(rename_to_hub_keys(load_file(file), renames), file, metadata={"format": "pt"})


# llava-hf checkpoints keep CLIP's `vision_model` wrapper and the language model's `model.` level.
LLAVA_HUB_RENAMES = [("vision_tower.", "vision_tower.vision_model."), ("model.language_model.", "language_model.model.")]


def build_tiny_llava(
    path: str | os.PathLike,
    *,
    stock: bool = False,
    hub_layout: bool = False,
    clip_text: bool = False,
    seed: int = 0,
    image_size: int = 84,
    text_heads: int = 4,
    vision: dict | None = None,
    text: dict | None = None,
    **mfpruner,
) -> Path:
    """Writes a tiny LLaVA-1.5 folder. stock=True: a plain `LlavaForConditionalGeneration`
    checkpoint (model_type llava); else an MFPruner remote-code repo (auto_map, code files).
    hub_layout=True rewrites the weight names the way llava-hf's hub checkpoints store them.
    clip_text=True adds a tiny CLIP text tower for the paper's relevance cue. text_heads=2 gives
    the language model 32-wide heads (vLLM's CPU attention runs float32 only from 32 up).
    vision / text: sizes that replace the toy ones (tiny_llava_config)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    processor = build_tiny_llava_processor(image_size)
    vocab_size = len(processor.tokenizer)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    if stock:
        config = tiny_llava_config(vocab_size, image_token_id, image_size=image_size, text_heads=text_heads,
                                   vision=vision, text=text)
        model = LlavaForConditionalGeneration(config)
    else:
        from modeling_mfpruner_llava import MFPrunerLlavaForConditionalGeneration

        if clip_text:
            mfpruner["clip_text_config"] = tiny_clip_text_config(vocab_size)
        mfpruner.setdefault("visual_token_budget", 8)
        config = tiny_llava_config(vocab_size, image_token_id, image_size=image_size, text_heads=text_heads,
                                   vision=vision, text=text, **mfpruner)
        model = MFPrunerLlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 3
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    if hub_layout:
        to_hub_key_layout(path, LLAVA_HUB_RENAMES)
    return path


# ----------------------------------------------------------------------------- export sources
# A tiny CLIP checkpoint (the source of the paper's text tower) and the hub's old LLaVA layout,
# for `tools.export` and its tests.


def build_tiny_clip(path: str | os.PathLike, *, vision_from: str | os.PathLike | None = None, seed: int = 1) -> Path:
    """Writes a tiny CLIPModel checkpoint (text tower + both projections) with a tokenizer whose
    window is the text tower's 16 positions and which adds <s> ... </s> like CLIP's tokenizer.

    vision_from: a tiny stock LLaVA / LLaVA-NeXT folder; its vision tower becomes this CLIP's vision model, as
    openai/clip-vit-large-patch14-336 is LLaVA-1.5's (random vision weights without it)."""
    from tokenizers import processors
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    tokenizer = build_tokenizer()
    text_config = tiny_clip_text_config(len(tokenizer))
    tokenizer.model_max_length = text_config["max_position_embeddings"]
    tokenizer.chat_template = None
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    vision_config = tiny_llava_config(len(tokenizer), 4).vision_config
    llava = None
    if vision_from is not None:  # a stock LLaVA or LLaVA-NeXT folder: its tower's config and weights
        from transformers import AutoModelForImageTextToText

        llava = AutoModelForImageTextToText.from_pretrained(vision_from)
        vision_config = llava.config.vision_config
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config.to_dict(), projection_dim=16))
    if llava is not None:
        clip.vision_model.load_state_dict(llava.model.vision_tower.state_dict())
    clip.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def rewrite_as_hub_layout(path: str | os.PathLike, max_shard_bytes: int | None = None) -> Path:
    """Rewrites a stock tiny LLaVA folder (5.x save_pretrained layout) in place into the layout of
    the older hub checkpoints (llava-hf/llava-1.5-7b-hf): `vision_tower.vision_model.*` keys,
    optional sharding with an index, legacy config fields and a separate preprocessor_config.json."""
    import json

    from safetensors.torch import load_file, save_file

    path = Path(path)
    state = rename_to_hub_keys(load_file(path / "model.safetensors"), LLAVA_HUB_RENAMES)
    (path / "model.safetensors").unlink()
    shards, current, size = [], {}, 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if current and max_shard_bytes is not None and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = value, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    config = json.loads((path / "config.json").read_text())
    config.update(ignore_index=-100, vocab_size=config["text_config"]["vocab_size"], transformers_version="4.36.0.dev0")
    config["text_config"]["_name_or_path"] = "lmsys/vicuna-7b-v1.5"
    (path / "config.json").write_text(json.dumps(config, indent=2))
    processor_config = json.loads((path / "processor_config.json").read_text())
    (path / "preprocessor_config.json").write_text(json.dumps(processor_config.pop("image_processor"), indent=2))
    (path / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    return path


# ----------------------------------------------------------------------------- Qwen2.5-VL

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_PATCH = 14  # pixels per patch side; a visual token merges 2 x 2 patches (28 x 28 px)


def build_tiny_qwen2_5_vl_processor(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 64):
    """(tokenizer, image processor) of a tiny Qwen2.5-VL repo: a local BPE tokenizer with Qwen's
    special tokens and chat template, and the Qwen2-VL image processor (images resized to
    multiples of 28 px between min and max pixels: 4 to 64 visual tokens).

    No stock `Qwen2_5_VLProcessor`: in transformers 5.x it cannot be built without a video processor,
    and the video processor needs torchvision (not a requirement here). The MFPruner repo ships
    processing_mfpruner.MFPrunerQwen2_5_VLProcessor (images and text) as its AutoProcessor;
    `qwen_inputs` expands the placeholders as the processor does and also builds video inputs."""
    tokenizer = build_tokenizer(
        special_tokens=QWEN_SPECIAL_TOKENS,
        named_tokens=dict(
            unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            extra_special_tokens={
                "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
            },
        ),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    image_processor = image_processor_class("Qwen2VLImageProcessor")(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=QWEN_PATCH, merge_size=2
    )
    return tokenizer, image_processor


def qwen_inputs(
    tokenizer, image_processor, texts: list[str], images=None, videos=None, video_fps: float = 2.0, video_mean_std=(0.5, 0.5)
) -> dict:
    """What `Qwen2_5_VLProcessor(text=texts, images=images)` returns, for the tiny repos.

    texts: prompts holding one <|image_pad|> / <|video_pad|> per image / video, in order; images:
    PIL images (all rows, prompt order); videos: list of (T, 3, H, W) frame tensors, values in
    [0, 1], sampled at video_fps (second_per_grid_ts = 2 frames / fps), normalized with
    video_mean_std (per channel; the stock video processor uses the image processor's
    image_mean / image_std). Each placeholder is expanded to the item's visual token count; rows
    are left padded."""
    inputs, counts = {}, {"<|image_pad|>": [], "<|video_pad|>": []}
    if images:
        pixels = image_processor(images=images, return_tensors="pt")
        inputs.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        counts["<|image_pad|>"] = (pixels["image_grid_thw"].prod(-1) // 4).tolist()
    if videos:
        parts = [qwen_video_inputs(frames, mean=video_mean_std[0], std=video_mean_std[1]) for frames in videos]
        inputs["pixel_values_videos"] = torch.cat([p["pixel_values_videos"] for p in parts])
        inputs["video_grid_thw"] = torch.cat([p["video_grid_thw"] for p in parts])
        inputs["second_per_grid_ts"] = torch.full((len(parts),), 2 / video_fps)
        counts["<|video_pad|>"] = (inputs["video_grid_thw"].prod(-1) // 4).tolist()
    expanded = []
    for text in texts:  # split on both placeholders, keeping them, and repeat each one
        pieces = re.split(r"(<\|image_pad\|>|<\|video_pad\|>)", text)
        expanded.append("".join(p * counts[p].pop(0) if p in counts else p for p in pieces))
    encoded = tokenizer(expanded, return_tensors="pt", padding=True)
    ids = encoded["input_ids"]
    mm_types = (ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()
    mm_types += 2 * (ids == tokenizer.convert_tokens_to_ids("<|video_pad|>")).int()
    return {"input_ids": ids, "attention_mask": encoded["attention_mask"], "mm_token_type_ids": mm_types, **inputs}


def qwen_video_inputs(
    frames: torch.Tensor, temporal_patch_size: int = 2, merge_size: int = 2, patch_size: int = QWEN_PATCH, mean=0.5, std=0.5
) -> dict:
    """Video frames (T, 3, H, W), values in [0, 1], H and W multiples of 2 * patch_size, T a multiple
    of 2 -> `pixel_values_videos` (T/2 * H/p * W/p, 3 * 2 * p * p) and `video_grid_thw` (1, 3), in the
    Qwen2-VL video processor's patch layout (each 2 x 2 merge group contiguous); p: 14 (Qwen2.5-VL)
    or 16 (Qwen3-VL). mean, std: the normalization, a number or one per channel."""
    t, c, h, w = frames.shape
    grid_t, grid_h, grid_w = t // temporal_patch_size, h // patch_size, w // patch_size
    mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in (mean, std))
    patches = ((frames - mean) / std).reshape(
        grid_t, temporal_patch_size, c,
        grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size,
    )
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, c * temporal_patch_size * patch_size * patch_size)
    return {"pixel_values_videos": flat.float(), "video_grid_thw": torch.tensor([[grid_t, grid_h, grid_w]])}


def tiny_qwen2_5_vl_config(
    tokenizer, stock: bool = False, text_heads: int = 4, vision: dict | None = None, text: dict | None = None, **mfpruner
):
    """Qwen2.5-VL with the real layout at toy width: 4 vision blocks (1 and 3 full attention,
    0 and 2 windowed over 2 x 2 visual tokens), 2 x 2 merge, a 2-layer M-RoPE text model.
    text_heads=2 gives the text model 32-wide heads (vLLM's CPU attention runs float32 from 32 up).
    vision / text: sizes that replace the toy ones (the serving benchmark's cpu size)."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    vision = {
        **dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=QWEN_PATCH,
               spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3],
               tokens_per_second=2),
        **(vision or {}),
    }
    text = {
        **dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=text_heads,
               num_key_value_heads=2, max_position_embeddings=1024,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [n * 4 // text_heads for n in (2, 3, 3)]}),
        **(text or {}),
        "vocab_size": len(tokenizer), "pad_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
        "bos_token_id": None,
    }
    kwargs = qwen_config_kwargs(tokenizer, vision, text)
    if stock:
        return Qwen2_5_VLConfig(**kwargs)
    from configuration_mfpruner import MFPrunerQwen2_5_VLConfig

    return MFPrunerQwen2_5_VLConfig(**kwargs, **mfpruner)


def qwen_config_kwargs(tokenizer, vision: dict, text: dict) -> dict:
    """A Qwen-VL config's sub-configs and its vision token ids from the tiny tokenizer."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vision_config=vision, text_config=text,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )


def save_tiny_qwen(model, tokenizer, image_processor, path: Path) -> Path:
    """Saves a tiny Qwen-VL model with its tokenizer and image processor (generation pads and stops
    with the text config's tokens)."""
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def build_tiny_qwen2_5_vl(
    path: str | os.PathLike, *, stock: bool = False, seed: int = 0, text_heads: int = 4,
    max_pixels: int = 28 * 28 * 64, vision: dict | None = None, text: dict | None = None, **mfpruner,
) -> Path:
    """Writes a tiny Qwen2.5-VL folder. stock=True: a plain `Qwen2_5_VLForConditionalGeneration`
    checkpoint (model_type qwen2_5_vl); else an MFPruner remote-code repo (auto_map, code files).
    Same seed = same weights in both. max_pixels: the image processor's limit (28 x 28 px a token).
    vision / text: sizes that replace the toy ones (tiny_qwen2_5_vl_config)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    tokenizer, image_processor = build_tiny_qwen2_5_vl_processor(max_pixels=max_pixels)
    torch.manual_seed(seed)
    if stock:
        model = Qwen2_5_VLForConditionalGeneration(
            tiny_qwen2_5_vl_config(tokenizer, stock=True, text_heads=text_heads, vision=vision, text=text)
        )
    else:
        from modeling_mfpruner_qwen2_5_vl import MFPrunerQwen2_5_VLForConditionalGeneration

        model = MFPrunerQwen2_5_VLForConditionalGeneration(
            tiny_qwen2_5_vl_config(tokenizer, text_heads=text_heads, vision=vision, text=text, **mfpruner)
        )
    save_tiny_qwen(model, tokenizer, image_processor, path)
    if not stock:  # AutoProcessor of the repo: images and text without torchvision (processing_mfpruner)
        from processing_mfpruner import MFPrunerQwen2_5_VLProcessor

        MFPrunerQwen2_5_VLProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- Qwen3-VL (dense and MoE)

QWEN3_VL_PATCH = 16  # pixels per patch side; a visual token merges 2 x 2 patches (32 x 32 px)


def build_tiny_qwen3_vl_processor(min_pixels: int = 64 * 64, max_pixels: int = 32 * 32 * 64):
    """(tokenizer, image processor) of a tiny Qwen3-VL repo: Qwen2.5-VL's tokenizer and the Qwen2-VL
    image processor with Qwen3-VL's 16 px patches (images resized to multiples of 32 px: 4 to 64
    visual tokens). `qwen_inputs` expands image placeholders; `qwen3_vl_video_prompt` writes a video's."""
    tokenizer, _ = build_tiny_qwen2_5_vl_processor()
    image_processor = image_processor_class("Qwen2VLImageProcessor")(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=QWEN3_VL_PATCH, merge_size=2
    )
    return tokenizer, image_processor


def qwen3_vl_video_inputs(tokenizer, texts: list[str], frames: torch.Tensor, seconds_per_pair: float = 1.0) -> dict:
    """What Qwen3VLProcessor returns for prompts with one video each (`<|video_pad|>` in each text; the
    same (T, 3, H, W) frames for every row): each frame pair becomes `<t seconds><|vision_start|>`
    + its tokens + `<|vision_end|>` (the timestamps are text), rows left padded."""
    video = qwen_video_inputs(frames, patch_size=QWEN3_VL_PATCH)
    grid_t, grid_h, grid_w = video["video_grid_thw"][0].tolist()
    per_pair = grid_h * grid_w // 4
    placeholder = "".join(
        f"<{(pair + 0.5) * seconds_per_pair:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_pair + "<|vision_end|>"
        for pair in range(grid_t)
    )
    expanded = [text.replace("<|vision_start|><|video_pad|><|vision_end|>", placeholder) for text in texts]
    encoded = tokenizer(expanded, return_tensors="pt", padding=True)
    ids = encoded["input_ids"]
    mm_types = 2 * (ids == tokenizer.convert_tokens_to_ids("<|video_pad|>")).int()
    return {
        "input_ids": ids, "attention_mask": encoded["attention_mask"], "mm_token_type_ids": mm_types,
        "pixel_values_videos": video["pixel_values_videos"].repeat(len(texts), 1),
        "video_grid_thw": video["video_grid_thw"].repeat(len(texts), 1),
    }


def tiny_qwen3_vl_config(
    tokenizer, stock: bool = False, moe: bool = False, text_heads: int = 4, moe_intermediate_size: int = 32, **mfpruner
):
    """Qwen3-VL with the real layout at toy width: 4 vision blocks with DeepStack mergers after blocks
    1 and 2 (added after text layers 0 and 1), 16 px patches, 2 x 2 merge, a 3-layer text model with
    interleaved M-RoPE; moe=True: Qwen3-VL MoE (4 experts, 2 per token). text_heads=2 gives the text
    model 32-wide heads (vLLM's CPU attention runs float32 from 32 up); moe_intermediate_size other than
    32 makes the experts' matrices non-square (see `rewrite_qwen3_vl_moe_as_hub_layout`)."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    ids = tokenizer.convert_tokens_to_ids
    vision = dict(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=QWEN3_VL_PATCH,
        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[1, 2],
    )
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=text_heads,
        num_key_value_heads=2, head_dim=64 // text_heads, max_position_embeddings=1024, pad_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"), bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [n * 4 // text_heads for n in (2, 3, 3)],
                         "mrope_interleaved": True},
    )
    if moe:
        # norm_topk_prob: the hub configs carry it; transformers always normalizes, vLLM's MoE block reads it
        text.update(moe_intermediate_size=moe_intermediate_size, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True)
    kwargs = qwen_config_kwargs(tokenizer, vision, text)
    if stock:
        return (Qwen3VLMoeConfig if moe else Qwen3VLConfig)(**kwargs)
    from configuration_mfpruner import MFPrunerQwen3VLConfig, MFPrunerQwen3VLMoeConfig

    return (MFPrunerQwen3VLMoeConfig if moe else MFPrunerQwen3VLConfig)(**kwargs, **mfpruner)


def build_tiny_qwen3_vl(path: str | os.PathLike, *, stock: bool = False, seed: int = 0, moe: bool = False, **mfpruner) -> Path:
    """Writes a tiny Qwen3-VL folder (moe=True: Qwen3-VL MoE). stock=True: a plain stock checkpoint
    (model_type qwen3_vl / qwen3_vl_moe); else an MFPruner remote-code repo. Same seed = same weights."""
    if stock:
        from transformers import Qwen3VLForConditionalGeneration as Dense, Qwen3VLMoeForConditionalGeneration as Moe
    else:
        from modeling_mfpruner_qwen3_vl import (
            MFPrunerQwen3VLForConditionalGeneration as Dense,
            MFPrunerQwen3VLMoeForConditionalGeneration as Moe,
        )
    config_for = functools.partial(tiny_qwen3_vl_config, stock=stock, moe=moe, **mfpruner)
    return write_tiny_qwen3(path, seed, config_for, Moe if moe else Dense)


def write_tiny_qwen3(
    path: str | os.PathLike, seed: int, config_for: Callable, model_class, max_pixels: int = 32 * 32 * 64
) -> Path:
    """A tiny Qwen3-VL-style folder (Qwen3-VL's tiny tokenizer and image processor up to `max_pixels`):
    `config_for(tokenizer)`, random weights from `seed`, saved by `save_tiny_qwen`."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    tokenizer, image_processor = build_tiny_qwen3_vl_processor(max_pixels=max_pixels)
    config = config_for(tokenizer)
    torch.manual_seed(seed)
    return save_tiny_qwen(model_class(config), tokenizer, image_processor, path)


def rewrite_qwen3_vl_moe_as_hub_layout(path: str | os.PathLike) -> Path:
    """Rewrites a tiny Qwen3-VL MoE folder (transformers 5.x save_pretrained layout) in place into the
    hub checkpoints' expert layout (Qwen/Qwen3-VL-30B-A3B-Instruct, what tools.export copies and vLLM
    loads): `experts.gate_up_proj` (E, hidden, 2 x moe_intermediate), `experts.down_proj` (E,
    moe_intermediate, hidden). transformers transposes them back on load only where the shapes
    differ, so the tiny model needs non-square experts (moe_intermediate_size != 32)."""
    from safetensors.torch import load_file, save_file

    file = Path(path) / "model.safetensors"
    state = load_file(file)
    for key, value in state.items():
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            if value.shape[1] == value.shape[2]:
                raise ValueError(f"{key} is square {tuple(value.shape)}: its hub layout would not load in transformers")
            state[key] = value.transpose(1, 2).contiguous()
    save_file(state, file, metadata={"format": "pt"})
    return Path(path)


def build_tiny_qwen3_vl_moe(path: str | os.PathLike, *, stock: bool = False, seed: int = 0, **mfpruner) -> Path:
    """A tiny Qwen3-VL MoE folder (see `build_tiny_qwen3_vl`)."""
    return build_tiny_qwen3_vl(path, stock=stock, seed=seed, moe=True, **mfpruner)


# ----------------------------------------------------------------------------- Qwen3.5


def tiny_qwen3_5_config(
    tokenizer, stock: bool = False, moe: bool = False, linear_head_dim: int = 16, vision: dict | None = None,
    text: dict | None = None, **mfpruner
):
    """Qwen3.5 with the real layout at toy width: Qwen3-VL's tiny tower without DeepStack, a 4-layer
    text model in the published pattern (3 Gated DeltaNet linear-attention layers, then 1
    full-attention layer), gated full attention with a quarter of each head rotated, interleaved
    M-RoPE; moe=True: Qwen3.5 MoE (4 experts, 2 per token, and a shared expert). linear_head_dim:
    the linear-attention key / value head width (vLLM's CPU kernel takes 64 or 128). vision / text:
    sizes that replace the toy ones (the serving benchmark's cpu size)."""
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    ids = tokenizer.convert_tokens_to_ids
    vision = {
        **dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=QWEN3_VL_PATCH,
               spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64),
        **(vision or {}),
    }
    text = {
        **dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=linear_head_dim,
               linear_value_head_dim=linear_head_dim, linear_conv_kernel_dim=4, max_position_embeddings=1024,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        **(text or {}),
        "vocab_size": len(tokenizer), "pad_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
        "bos_token_id": None,
    }
    if moe:
        text.update(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
        del text["intermediate_size"]
    kwargs = qwen_config_kwargs(tokenizer, vision, text)
    if stock:
        return (Qwen3_5MoeConfig if moe else Qwen3_5Config)(**kwargs)
    from configuration_mfpruner import MFPrunerQwen3_5Config, MFPrunerQwen3_5MoeConfig

    return (MFPrunerQwen3_5MoeConfig if moe else MFPrunerQwen3_5Config)(**kwargs, **mfpruner)


def build_tiny_qwen3_5(
    path: str | os.PathLike, *, stock: bool = False, seed: int = 0, moe: bool = False, max_pixels: int = 32 * 32 * 64,
    **mfpruner,
) -> Path:
    """Writes a tiny Qwen3.5 folder (Qwen3-VL's tiny tokenizer and image processor; moe=True: Qwen3.5 MoE).
    stock=True: a plain stock checkpoint (model_type qwen3_5 / qwen3_5_moe); else an MFPruner remote-code
    repo. Same seed = same weights. max_pixels: the image processor's limit (32 x 32 px a token);
    mfpruner: tiny_qwen3_5_config's options and the MFPruner settings."""
    if stock:
        from transformers import Qwen3_5ForConditionalGeneration as Dense, Qwen3_5MoeForConditionalGeneration as Moe
    else:
        from modeling_mfpruner_qwen3_5 import (
            MFPrunerQwen3_5ForConditionalGeneration as Dense,
            MFPrunerQwen3_5MoeForConditionalGeneration as Moe,
        )
    config_for = functools.partial(tiny_qwen3_5_config, stock=stock, moe=moe, **mfpruner)
    return write_tiny_qwen3(path, seed, config_for, Moe if moe else Dense, max_pixels=max_pixels)


def build_tiny_qwen3_5_moe(path: str | os.PathLike, *, stock: bool = False, seed: int = 0, **mfpruner) -> Path:
    """A tiny Qwen3.5 MoE folder (see `build_tiny_qwen3_5`)."""
    return build_tiny_qwen3_5(path, stock=stock, seed=seed, moe=True, **mfpruner)


# ----------------------------------------------------------------------------- LLaVA-1.6 (LLaVA-NeXT)

# Tiles of 56 px with 14 px patches (4 x 4 = 16 tokens a tile); up to a 2 x 2 grid of tiles, so a
# square image gives 16 (base) + 8 x 8 (grid) + 8 (newlines) = 88 visual tokens.
NEXT_TILE_SIZE = 56
NEXT_GRID_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def tiny_llava_next_config(vocab_size: int, image_token_id: int, *, tile_size: int = NEXT_TILE_SIZE,
                           grid_pinpoints=NEXT_GRID_PINPOINTS, mfpruner: bool = False, text_heads: int = 4,
                           **config_overrides):
    """A scaled-down LLaVA-1.6: the tiny LLaVA-1.5 towers on `tile_size` tiles, anyres pinpoints."""
    from transformers import LlavaNextConfig

    base = tiny_llava_config(vocab_size, image_token_id, image_size=tile_size, text_heads=text_heads)
    kwargs = dict(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_index=image_token_id,
        image_grid_pinpoints=[list(p) for p in grid_pinpoints],
    )
    if mfpruner:
        from configuration_mfpruner import MFPrunerLlavaNextConfig

        return MFPrunerLlavaNextConfig(**kwargs, **config_overrides)
    return LlavaNextConfig(**kwargs, **config_overrides)


def build_tiny_llava_next_processor(tile_size: int = NEXT_TILE_SIZE, grid_pinpoints=NEXT_GRID_PINPOINTS):
    from transformers import LlavaNextProcessor

    image_processor = image_processor_class("LlavaNextImageProcessor")(
        size={"shortest_edge": tile_size},
        crop_size={"height": tile_size, "width": tile_size},
        image_grid_pinpoints=[list(p) for p in grid_pinpoints],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=14,
        num_additional_image_tokens=1,  # the [CLS] token, dropped by the "default" strategy
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llava_next(
    path: str | os.PathLike,
    stock: bool = False,
    hub_layout: bool = False,
    seed: int = 0,
    clip_text: bool = False,
    tile_size: int = NEXT_TILE_SIZE,
    grid_pinpoints=NEXT_GRID_PINPOINTS,
    text_heads: int = 4,
    **overrides,
) -> Path:
    """Writes a tiny LLaVA-1.6 (LLaVA-NeXT) folder. stock=True: a plain
    `LlavaNextForConditionalGeneration` checkpoint; else an MFPruner remote-code repo.
    hub_layout=True rewrites the weight names the way llava-hf's hub checkpoints store them.
    `overrides` go to the config (MFPruner settings, or stock LlavaNextConfig fields). text_heads=2
    gives the language model 32-wide heads (vLLM's CPU attention runs float32 only from 32 up)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    processor = build_tiny_llava_next_processor(tile_size, grid_pinpoints)
    vocab_size = len(processor.tokenizer)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    if stock:
        from transformers import LlavaNextForConditionalGeneration

        config = tiny_llava_next_config(
            vocab_size, image_token_id, tile_size=tile_size, grid_pinpoints=grid_pinpoints, text_heads=text_heads, **overrides
        )
        model = LlavaNextForConditionalGeneration(config)
    else:
        from modeling_mfpruner_llava import MFPrunerLlavaNextForConditionalGeneration

        if clip_text:
            overrides["clip_text_config"] = tiny_clip_text_config(vocab_size)
        config = tiny_llava_next_config(
            vocab_size, image_token_id, tile_size=tile_size, grid_pinpoints=grid_pinpoints, mfpruner=True,
            text_heads=text_heads, **overrides
        )
        model = MFPrunerLlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = 3
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    if hub_layout:
        to_hub_key_layout(path, LLAVA_HUB_RENAMES)  # the same renames as LLaVA-1.5 (image_newline stays top level)
    return path
