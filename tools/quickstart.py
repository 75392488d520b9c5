"""Loads the built-in tiny MFPruner LLaVA (random weights), prunes one image, prints what it kept.

    python -m tools.quickstart [--budget 8]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from tools.tiny_models import build_tiny_llava


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=8, help="visual tokens kept per image")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        repo = build_tiny_llava(f"{folder}/tiny-mfpruner-llava")
        model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    inputs = processor(images=image, text="USER: <image>\nWhat is in the image? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False, visual_token_budget=args.budget)
    result = model.last_pruning
    print("tiny model with RANDOM weights: the answer is noise, the pruning is real")
    print(f"visual tokens: {result.num_visual_tokens[0]}, kept: {len(result.keep_indices[0])}")
    print(f"kept indices: {result.keep_indices[0].tolist()}")
    print(f"LLM prefill length: {result.lm_input_length} (unpruned {inputs['input_ids'].shape[1]})")
    print("answer:", processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0])


if __name__ == "__main__":
    main()
