"""Prefill time of MFPruner LLaVA-1.6 on CPU at LLaVA-1.6-7B's token geometry, side by side.

A random-weight model: CLIP ViT-L/14-336 vision geometry (336 px tiles, 14 px patches, 1024 wide,
24 layers unless --vision-layers), LLaVA-1.6's anyres pinpoints, and a narrow Llama. One 672x672
image -> a base tile + 2 x 2 grid tiles = 5 tiles, 576 + 48 x 48 patch tokens + 48 newlines =
2,928 visual tokens. Each setting runs the same prefill (`forward`, last-token logits, as
generate's first step does); times are the minimum over --repeats runs, all in this one process:

    python -m tools.prefill_llava_next [--vision-layers 24] [--repeats 2]

Columns: total prefill; vision (tower + projector + packing: `encode_images`); cue + vote (the rest
of `prune_inputs`: cues, vote, splice); language model; cue + vote as % of that row's prefill.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextImageProcessor, LlavaNextProcessor

from configuration_mfpruner import MFPrunerLlavaNextConfig
from modeling_mfpruner_llava import MFPrunerLlavaNextForConditionalGeneration
from tools.tiny_models import CHAT_TEMPLATE, build_tokenizer

RATIOS = (0.222, 0.111, 0.056)
LLAVA_16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build_model(vision_layers: int, llm_hidden: int, llm_layers: int, vocab_size: int, image_token_id: int):
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=llm_hidden, intermediate_size=llm_hidden * 11 // 4,
        num_hidden_layers=llm_layers, num_attention_heads=llm_hidden // 128, max_position_embeddings=4096,
        pad_token_id=3, bos_token_id=1, eos_token_id=2,
    )
    config = MFPrunerLlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id, image_grid_pinpoints=LLAVA_16_PINPOINTS,
        vision_feature_layer=-2 if vision_layers > 1 else -1,
    )
    torch.manual_seed(0)
    return MFPrunerLlavaNextForConditionalGeneration(config).eval()


class Stopwatch:
    """Wall time of each call of one bound method of one model instance (this script's instance only)."""

    def __init__(self, model, name: str):
        self.seconds = 0.0
        method = getattr(model, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(model, name, timed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision-layers", type=int, default=24, help="CLIP-L/336 has 24")
    parser.add_argument("--llm-hidden", type=int, default=1024)
    parser.add_argument("--llm-layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    tokenizer = build_tokenizer()
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=LLAVA_16_PINPOINTS
        ),
        tokenizer=tokenizer, patch_size=14, num_additional_image_tokens=1, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (672, 672, 3), dtype=np.uint8))
    inputs = processor(images=image, text="USER: <image>\nWhat is in the image? ASSISTANT:", return_tensors="pt")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    model = build_model(args.vision_layers, args.llm_hidden, args.llm_layers, len(tokenizer), image_token_id)
    encode, prune = Stopwatch(model, "encode_images"), Stopwatch(model, "prune_inputs")
    lm_seconds = []
    lm = model.model.language_model
    lm.register_forward_pre_hook(lambda *a: lm_seconds.append(-time.perf_counter()))
    lm.register_forward_hook(lambda *a: lm_seconds.append(time.perf_counter()))

    visual = int((inputs["input_ids"] == image_token_id).sum())
    print(f"torch threads {torch.get_num_threads()}; vision: CLIP-L/336 geometry, {args.vision_layers} layers; "
          f"LLM: Llama {args.llm_hidden} wide, {args.llm_layers} layers; tiles {inputs['pixel_values'].shape[1]}; "
          f"visual tokens {visual}; prompt {inputs['input_ids'].shape[1]} tokens")
    settings = [("unpruned", dict(prune_visual_tokens=False))] + [(f"ratio {r}", dict(visual_token_ratio=r)) for r in RATIOS]
    print(f"{'setting':<12}{'LM tokens':>10}{'prefill s':>11}{'speedup':>9}{'vision s':>10}{'cue+vote s':>12}"
          f"{'LM s':>8}{'LM speedup':>12}{'cue+vote %':>12}", flush=True)
    unpruned = None
    for name, kwargs in settings:
        best = None
        for _ in range(args.repeats):
            encode.seconds = prune.seconds = 0.0
            lm_seconds.clear()
            start = time.perf_counter()
            with torch.no_grad():
                model(**inputs, logits_to_keep=1, **kwargs)
            total = time.perf_counter() - start
            lm_time = sum(lm_seconds)
            vision = encode.seconds if prune.seconds else total - lm_time  # unpruned: stock vision + packing
            cues = prune.seconds - encode.seconds
            best = (total, vision, cues, lm_time) if best is None or total < best[0] else best
        total, vision, cues, lm_time = best
        unpruned = unpruned or best  # the first setting
        length = model.last_pruning.lm_input_length if "visual_token_ratio" in kwargs else inputs["input_ids"].shape[1]
        print(f"{name:<12}{length:>10}{total:>11.2f}{unpruned[0] / total:>8.2f}x{vision:>10.2f}{cues:>12.3f}"
              f"{lm_time:>8.2f}{unpruned[3] / lm_time:>11.2f}x{100 * cues / total:>11.2f}%", flush=True)


if __name__ == "__main__":
    main()
