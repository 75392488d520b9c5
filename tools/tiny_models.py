"""Tiny MFPruner models with random weights, built locally (no download), saved as complete
remote-code model folders: config with auto_map, weights, the custom code, a processor.

Tests and the demo's default model use them. The geometry is a scaled-down LLaVA-1.5:
a CLIP vision tower on 84 px images with 14 px patches (6 x 6 = 36 visual tokens), a
two-layer MLP projector, and a small Llama.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
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


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few lines: any text encodes, ids are deterministic."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
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


def tiny_llava_config(vocab_size: int, image_token_id: int, *, image_size: int = 84, **mfpruner) -> "LlavaConfig":
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
    )
    tokens = (image_size // 14) ** 2
    kwargs = dict(vision_config=vision, text_config=text, image_token_index=image_token_id, image_seq_length=tokens)
    if mfpruner:
        from configuration_mfpruner import MFPrunerLlavaConfig

        return MFPrunerLlavaConfig(**kwargs, **mfpruner)
    return LlavaConfig(**kwargs)


def build_tiny_llava_processor(image_size: int = 84) -> LlavaProcessor:
    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessor(
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


def to_hub_key_layout(path: Path, renames: list[tuple[str, str]]) -> None:
    """Rewrites a saved checkpoint's keys into the layout of the hub's checkpoints (prefix renames)."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    renamed = {}
    for key, tensor in tensors.items():
        for old, new in renames:
            if key.startswith(old) and not key.startswith(new):
                key = new + key[len(old) :]
                break
        renamed[key] = tensor
    save_file(renamed, file, metadata={"format": "pt"})


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
    **mfpruner,
) -> Path:
    """Writes a tiny LLaVA-1.5 folder. stock=True: a plain `LlavaForConditionalGeneration`
    checkpoint (model_type llava); else an MFPruner remote-code repo (auto_map, code files).
    hub_layout=True rewrites the weight names the way llava-hf's hub checkpoints store them.
    clip_text=True adds a tiny CLIP text tower for the paper's relevance cue."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    processor = build_tiny_llava_processor(image_size)
    vocab_size = len(processor.tokenizer)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    if stock:
        config = tiny_llava_config(vocab_size, image_token_id, image_size=image_size)
        model = LlavaForConditionalGeneration(config)
    else:
        from modeling_mfpruner_llava import MFPrunerLlavaForConditionalGeneration

        if clip_text:
            mfpruner["clip_text_config"] = tiny_clip_text_config(vocab_size)
        mfpruner.setdefault("visual_token_budget", 8)
        config = tiny_llava_config(vocab_size, image_token_id, image_size=image_size, **mfpruner)
        model = MFPrunerLlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 3
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    if hub_layout:
        to_hub_key_layout(path, LLAVA_HUB_RENAMES)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="output folder (replaced)")
    parser.add_argument("--stock", action="store_true", help="a stock LlavaForConditionalGeneration checkpoint")
    parser.add_argument("--clip-text", action="store_true", help="add a tiny CLIP text tower")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_llava(args.path, stock=args.stock, clip_text=args.clip_text, seed=args.seed))


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------- LLaVA-1.6 (LLaVA-NeXT)

# Tiles of 56 px with 14 px patches (4 x 4 = 16 tokens a tile); up to a 2 x 2 grid of tiles, so a
# square image gives 16 (base) + 8 x 8 (grid) + 8 (newlines) = 88 visual tokens.
NEXT_TILE_SIZE = 56
NEXT_GRID_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def tiny_llava_next_config(vocab_size: int, image_token_id: int, *, tile_size: int = NEXT_TILE_SIZE,
                           grid_pinpoints=NEXT_GRID_PINPOINTS, mfpruner: bool = False, **config_overrides):
    """A scaled-down LLaVA-1.6: the tiny LLaVA-1.5 towers on `tile_size` tiles, anyres pinpoints."""
    from transformers import LlavaNextConfig

    base = tiny_llava_config(vocab_size, image_token_id, image_size=tile_size)
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
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    image_processor = LlavaNextImageProcessor(
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
    **overrides,
) -> Path:
    """Writes a tiny LLaVA-1.6 (LLaVA-NeXT) folder. stock=True: a plain
    `LlavaNextForConditionalGeneration` checkpoint; else an MFPruner remote-code repo.
    hub_layout=True rewrites the weight names the way llava-hf's hub checkpoints store them.
    `overrides` go to the config (MFPruner settings, or stock LlavaNextConfig fields)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    processor = build_tiny_llava_next_processor(tile_size, grid_pinpoints)
    vocab_size = len(processor.tokenizer)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    if stock:
        from transformers import LlavaNextForConditionalGeneration

        config = tiny_llava_next_config(vocab_size, image_token_id, tile_size=tile_size, grid_pinpoints=grid_pinpoints, **overrides)
        model = LlavaNextForConditionalGeneration(config)
    else:
        from modeling_mfpruner_llava import MFPrunerLlavaNextForConditionalGeneration

        if clip_text:
            overrides["clip_text_config"] = tiny_clip_text_config(vocab_size)
        config = tiny_llava_next_config(
            vocab_size, image_token_id, tile_size=tile_size, grid_pinpoints=grid_pinpoints, mfpruner=True, **overrides
        )
        model = MFPrunerLlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = 3
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    if hub_layout:
        to_hub_key_layout(path, LLAVA_HUB_RENAMES)  # the same renames as LLaVA-1.5 (image_newline stays top level)
    return path
