"""Serving throughput with vLLM, MFPruner vs the stock model, same repo, prompts and images.

    python tools/benchmark_vllm.py --model path/to/mfpruner-repo            (on a GPU, vllm 0.33)
    python tools/benchmark_vllm.py --model REPO --requests 256 --image-size 672 --ratio 0.111

Each variant runs in its own process (one engine at a time): "mfpruner" (the repo's MFPruner
architecture, through mfpruner_vllm) and "stock" (the same weights served as vLLM's stock
architecture via hf_overrides, no pruning). Measured per variant:
  - requests/s and output tokens/s: all requests submitted at once to LLM.chat (continuous batching),
  - time to first token: median over `--ttft-requests` lone requests with max_tokens=1 (a prefill).
Prints a markdown table and writes JSON with `--output`. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (`python tools/benchmark_vllm.py`): the checkout's mfpruner_lib
    sys.path.append(str(ROOT))

from mfpruner_lib.cli import ArgumentParser, refusals_as_errors  # noqa: E402

STOCK = {
    "MFPrunerLlavaForConditionalGeneration": "LlavaForConditionalGeneration",
    "MFPrunerLlavaNextForConditionalGeneration": "LlavaNextForConditionalGeneration",
    "MFPrunerQwen2_5_VLForConditionalGeneration": "Qwen2_5_VLForConditionalGeneration",
}
QUESTIONS = ["What is in the image?", "Describe the picture in detail.", "What color is the car?", "Is there a dog?"]


def images(count: int, size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def conversation(image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": question}]}]


def run_variant(args) -> dict:
    """One engine: the throughput batch, then the lone requests; returns the measurements."""
    from vllm import LLM, SamplingParams

    architecture = json.loads((Path(args.model) / "config.json").read_text())["architectures"][0]
    kwargs = dict(model=args.model, max_model_len=args.max_model_len, limit_mm_per_prompt={"image": 1}, seed=0)
    kwargs.update(json.loads(args.llm_kwargs))
    if args.variant == "stock":
        kwargs["hf_overrides"] = {"architectures": [STOCK[architecture]]}
    llm = LLM(**kwargs)
    mm = {}
    if args.budget is not None:
        mm["visual_token_budget"] = args.budget
    if args.ratio is not None:
        mm["visual_token_ratio"] = args.ratio
    chat = dict(mm_processor_kwargs=mm) if mm and args.variant == "mfpruner" else {}
    pictures = images(args.requests, args.image_size)
    prompts = [conversation(p, QUESTIONS[i % len(QUESTIONS)]) for i, p in enumerate(pictures)]

    llm.chat(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False, **chat)  # warm-up
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.chat(prompts, params, use_tqdm=False, **chat)
    elapsed = time.perf_counter() - start
    ttft = []
    for prompt in prompts[: args.ttft_requests]:
        start = time.perf_counter()
        llm.chat([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False, **chat)
        ttft.append(time.perf_counter() - start)
    return {
        "variant": args.variant,
        "architecture": STOCK[architecture] if args.variant == "stock" else architecture,
        "requests": len(prompts),
        "mean_prompt_tokens": statistics.mean(len(o.prompt_token_ids) for o in outputs),
        "requests_per_s": len(prompts) / elapsed,
        "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed,
        "median_ttft_s": statistics.median(ttft),
    }


@refusals_as_errors
def main(argv=None) -> list[dict]:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an MFPruner repo (tools.export output)")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request")
    parser.add_argument("--ttft-requests", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=336, help="square synthetic images, pixels")
    parser.add_argument("--budget", type=int, help="per-request visual_token_budget (default: the repo's)")
    parser.add_argument("--ratio", type=float, help="per-request visual_token_ratio (default: the repo's)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--llm-kwargs", default="{}", help='JSON of extra LLM(...) arguments, e.g. \'{"dtype": "bfloat16"}\'')
    parser.add_argument("--variants", default="stock,mfpruner")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        Path(args.result).write_text(json.dumps(run_variant(args)))
        return []

    results = []
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as folder:
            result = Path(folder) / "result.json"
            child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--variant", variant, "--result", str(result)]
            subprocess.run(child, check=True, env=os.environ)
            results.append(json.loads(result.read_text()))
    print("| variant | architecture | requests | mean prompt tokens | requests/s | output tokens/s | median TTFT (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} | {r['architecture']} | {r['requests']} | {r['mean_prompt_tokens']:.0f} | "
            f"{r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | {r['median_ttft_s']:.4f} |"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
