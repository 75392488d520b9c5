"""GPU check (run by the lead on the device machine): each family's tiny model with the vision
side on the CPU and the language model on cuda:0 keeps the same tokens and gives the same logits
and greedy tokens as the unsplit model on the CPU.

    python tools/check_split_device_map.py     # prints one line per family, exits 1 on a mismatch
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer  # noqa: E402

from tests.conftest import random_image  # noqa: E402
from tools.tiny_models import build_tiny_llava, build_tiny_llava_next, build_tiny_qwen2_5_vl, qwen_inputs  # noqa: E402

LLAVA_PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
QWEN_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n<|im_start|>assistant\n"
LLAVA_MAP = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.language_model": 0, "lm_head": 0}
VISION_ON_CPU = {
    "llava": LLAVA_MAP,
    "llava_next": {**LLAVA_MAP, "model.image_newline": "cpu"},
    "qwen2_5_vl": {"model.visual": "cpu", "model.language_model": 0, "lm_head": 0},
}


def family_inputs(name: str, repo: Path) -> dict:
    if name == "qwen2_5_vl":
        tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
        image_processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
        return qwen_inputs(tokenizer, image_processor, [QWEN_PROMPT], images=[random_image(1, (112, 84))])
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    size = (96, 80) if name == "llava" else (100, 60)
    return processor(images=random_image(0, size), text=LLAVA_PROMPT, return_tensors="pt")


def check(name: str, repo: Path) -> bool:
    inputs = family_inputs(name, repo)
    device_map = VISION_ON_CPU[name]
    reference = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
    split = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, device_map=device_map).eval()
    with torch.no_grad():
        expected = reference(**inputs, visual_token_ratio=0.25)
        got = split(**inputs, visual_token_ratio=0.25)
    same_keep = [k.tolist() for k in split.last_pruning.keep_indices] == [k.tolist() for k in expected.pruning.keep_indices]
    same_logits = torch.allclose(got.logits.float().cpu(), expected.logits.float(), atol=1e-4, rtol=1e-4)
    greedy = dict(max_new_tokens=5, do_sample=False, visual_token_ratio=0.25)
    same_tokens = torch.equal(split.generate(**inputs, **greedy).cpu(), reference.generate(**inputs, **greedy))
    ok = same_keep and same_logits and same_tokens
    print(f"{name}: keep {same_keep}, logits {same_logits}, greedy tokens {same_tokens} -> {'OK' if ok else 'MISMATCH'}")
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs one GPU")
        return 1
    with tempfile.TemporaryDirectory() as folder:
        repos = {
            "llava": build_tiny_llava(Path(folder) / "llava"),
            "llava_next": build_tiny_llava_next(Path(folder) / "llava_next"),
            "qwen2_5_vl": build_tiny_qwen2_5_vl(Path(folder) / "qwen2_5_vl"),
        }
        results = [check(name, repo) for name, repo in repos.items()]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
