"""Prefill benchmark: unpruned vs MFPruner at the paper's budgets, side by side in one run.

For each model family, a model with the real token geometry (random weights, built in memory)
is timed unpruned and at every budget, the calls interleaved round by round (warm-up rounds
discarded, medians of the rest). Reported per setting:
  * prefill: the whole forward (vision tower, cues + vote + splice when pruning, LLM over the
    prompt, LM head on the last position) and its speed-up over the unpruned one;
  * the FLOPs-ideal speed-up of the same config and geometry (tools.flops) and the fraction of it
    reached; the same for the LLM-only prefill (the part pruning shortens);
  * cue overhead: the pruning path up to the LLM input (`prune_inputs`) minus the stock image
    encoding (vision tower + projector + embedding scatter), i.e. cue capture + cues + vote +
    splice, as a percentage of the pruned prefill: the median of the differences of the two
    calls run back to back in each round (a noisy machine can still make it slightly negative);
  * peak tensor memory of the prefill (tools.bench_utils) and decode tokens/s with the shorter
    KV cache (greedy, one token per step).

Sizes: "smoke" (tiny, seconds, for CI), "cpu" (real token counts, narrow and shallow towers),
"real" (the published sizes; meant for `--device cuda`). Absolute times mean something only on a
GPU; on a CPU the ratios are the result.

    python -m tools.benchmark_prefill --size cpu --output-dir benchmarks --plot assets/prefill_speedup.png
    python -m tools.benchmark_prefill --size real --device cuda --dtype bfloat16

A family is one `Family` entry in FAMILIES: how to build the model at each size, its inputs, its
budgets, and four small calls (stock encoding, pruning, LLM-only prefill, FLOPs).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tools import bench_utils, flops, model_sizes

SIZES = ("smoke", "cpu", "real")
PAPER_VISUAL_TOKENS = 576  # LLaVA-1.5's budgets 192/128/64/32 are "of 576"


@dataclass
class Family:
    """One model family in the benchmark.

    build(size, dtype, device): the model, eval mode. inputs(model, size, seed, device, text_tokens):
    the model's keyword inputs for one image + prompt (batch 1). budgets(num_visual_tokens): [(label, per-call kwargs)].
    encode(model, inputs): the stock image encoding up to the LLM input embeddings.
    prune(model, inputs, budget_kwargs): MFPruner's pruned LLM inputs (a dict with
    inputs_embeds, attention_mask, ...). lm_prefill(model, pruned): the LLM alone on them.
    prefill_flops(config, text_tokens, kept): tools.flops.PrefillFlops of that prefill.
    """

    name: str
    build: Callable
    inputs: Callable
    budgets: Callable
    encode: Callable
    prune: Callable
    lm_prefill: Callable
    prefill_flops: Callable
    text_tokens: dict = field(default_factory=lambda: {"smoke": 12, "cpu": 60, "real": 60})
    note: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- LLaVA-1.5

# Widths and depths per size. "cpu": the real 577-token tower input and ~60 + 576 prompt tokens,
# with the vision tower at ~5% of the prefill FLOPs as in the 7B model (tools.flops).
LLAVA_1_5_SIZES = {
    "smoke": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=84,
                    patch_size=14),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=512),
        image_token_id=500,
    ),
    "cpu": dict(
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6, image_size=336,
                    patch_size=14),
        text=dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096),
        image_token_id=32000,
    ),
    "real": dict(vision=model_sizes.CLIP_VIT_L_336, text=model_sizes.VICUNA_7B, image_token_id=32000),
}


def describe_llava(size: str) -> str:
    v, t = LLAVA_1_5_SIZES[size]["vision"], LLAVA_1_5_SIZES[size]["text"]
    return (
        f"CLIP tower {v['num_hidden_layers']} layers x {v['hidden_size']} at {v['image_size']} px "
        f"({(v['image_size'] // v['patch_size']) ** 2} visual tokens); Llama {t['num_hidden_layers']} layers x "
        f"{t['hidden_size']} (MLP {t['intermediate_size']})"
    )


def build_llava_1_5(size: str, dtype: torch.dtype, device: str):
    from configuration_mfpruner import MFPrunerLlavaConfig
    from modeling_mfpruner_llava import MFPrunerLlavaForConditionalGeneration

    sizes = LLAVA_1_5_SIZES[size]
    config = model_sizes.llava_config(
        sizes["vision"], sizes["text"], config_class=MFPrunerLlavaConfig, image_token_id=sizes["image_token_id"]
    )
    with torch.device(device):
        model = MFPrunerLlavaForConditionalGeneration(config)
    return model.to(dtype).eval()


def llava_1_5_inputs(model, size: str, seed: int, device: str, text_tokens: int) -> dict:
    """BOS, the first third of the text, the image placeholders, the rest of the text."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    image_size = config.vision_config.image_size
    visual = (image_size // config.vision_config.patch_size) ** 2
    text = torch.randint(5, config.image_token_id, (text_tokens - 1,), generator=generator)
    split = len(text) // 3
    image = torch.full((visual,), config.image_token_id)
    input_ids = torch.cat([torch.tensor([1]), text[:split], image, text[split:]])[None]
    pixel_values = torch.randn(1, 3, image_size, image_size, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device, model.dtype),
    }


def paper_budgets(num_visual_tokens: int) -> list[tuple[str, dict]]:
    """192 / 128 / 64 / 32 of 576, scaled to the model's visual tokens when it has fewer (smoke)."""
    budgets = []
    for paper in (192, 128, 64, 32):
        k = max(1, round(paper * num_visual_tokens / PAPER_VISUAL_TOKENS))
        budgets.append((str(paper) if k == paper else f"{paper} (= {k} of {num_visual_tokens})",
                        {"visual_token_budget": k}))
    return budgets


def llava_encode(model, inputs):
    """The stock path up to the LLM input: vision tower, projector, scatter into the embeddings."""
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features  # (I*N, D) or (I, N, D)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    is_image = (inputs["input_ids"] == model.config.image_token_id)[..., None]
    return embeds.masked_scatter(is_image, features.to(embeds.dtype))


def llava_prune(model, inputs, budget_kwargs):
    return model.prune_inputs(
        inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"], **budget_kwargs
    )


def llava_lm_prefill(model, pruned):
    mask = pruned["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.model.language_model(
        inputs_embeds=pruned["inputs_embeds"], attention_mask=mask, position_ids=positions, use_cache=True
    ).last_hidden_state
    return model.lm_head(hidden[:, -1:])


def llava_1_5_flops(config, text_tokens: int, kept: int | None):
    return flops.prefill_flops(config, text_tokens, kept)


FAMILIES = {
    "llava-1.5": Family(
        name="LLaVA-1.5",
        build=build_llava_1_5,
        inputs=llava_1_5_inputs,
        budgets=paper_budgets,
        encode=llava_encode,
        prune=llava_prune,
        lm_prefill=llava_lm_prefill,
        prefill_flops=llava_1_5_flops,
        note={size: describe_llava(size) for size in SIZES},
    ),
}


# ----------------------------------------------------------------------------- measuring


def lm_input_length(model, inputs, settings: dict) -> int:
    if settings.get("prune_visual_tokens") is False:
        return int(inputs["attention_mask"].shape[1])
    return int(model.last_pruning.lm_input_length)


def decode_tokens_per_second(model, inputs, settings: dict, steps: int, device: str) -> float:
    """Prefill (untimed), then `steps` greedy one-token forwards on its KV cache (timed)."""
    out = model(**inputs, **settings, use_cache=True, logits_to_keep=1)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    mask = torch.ones(1, lm_input_length(model, inputs, settings), dtype=torch.long, device=token.device)
    if cache.get_seq_length() != mask.shape[1]:  # decoding must run on the pruned (shorter) cache
        raise RuntimeError(f"KV cache holds {cache.get_seq_length()} positions, the LLM prefilled {mask.shape[1]}")
    bench_utils.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=-1)
        out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    bench_utils.synchronize(device)
    return steps / (time.perf_counter() - start)


def run_family(family: Family, size: str, repeats: int, warmup: int, decode_steps: int, device: str,
               dtype: torch.dtype, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = family.build(size, dtype, device)
    text_tokens = family.text_tokens[size]
    inputs = family.inputs(model, size, seed, device, text_tokens)
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    settings = [("unpruned", {"prune_visual_tokens": False})] + family.budgets(num_visual)

    with torch.inference_mode():
        calls, kept, lengths = {}, {}, {}
        for label, budget in settings:
            calls[f"prefill/{label}"] = lambda b=budget: model(**inputs, **b, use_cache=True, logits_to_keep=1)
            keep_all = {"visual_token_budget": num_visual} if label == "unpruned" else budget
            pruned = family.prune(model, inputs, keep_all)
            kept[label] = num_visual if label == "unpruned" else int(model.last_pruning.keep_indices[0].numel())
            calls[f"lm/{label}"] = lambda p=pruned: family.lm_prefill(model, p)
            if label != "unpruned":  # the stock encoding right before the pruning path: paired samples
                calls[f"encode/{label}"] = lambda: family.encode(model, inputs)
                calls[f"prune/{label}"] = lambda b=budget: family.prune(model, inputs, b)
            model(**inputs, **budget, use_cache=True, logits_to_keep=1)
            lengths[label] = lm_input_length(model, inputs, budget)
        samples = bench_utils.time_interleaved(calls, repeats, warmup, device)
        peak = {
            label: bench_utils.peak_memory(
                lambda b=budget: model(**inputs, **b, use_cache=True, logits_to_keep=1), device
            )[0]
            for label, budget in settings
        }
        decode = {
            label: bench_utils.median(
                [decode_tokens_per_second(model, inputs, budget, decode_steps, device) for _ in range(max(1, repeats // 2))]
            )
            for label, budget in settings
        }

    times = {name: bench_utils.median(values) for name, values in samples.items()}
    full_flops = family.prefill_flops(model.config, text_tokens, None)
    rows = []
    for label, _ in settings:
        pruned_flops = full_flops if label == "unpruned" else family.prefill_flops(model.config, text_tokens, kept[label])
        prefill, lm = times[f"prefill/{label}"], times[f"lm/{label}"]
        overhead = None
        if label != "unpruned":  # median of the per-round differences of adjacent calls
            overhead = bench_utils.median([p - e for p, e in zip(samples[f"prune/{label}"], samples[f"encode/{label}"])])
        rows.append(dict(
            setting=label,
            kept=kept[label],
            visual_tokens=num_visual,
            lm_length=lengths[label],
            prefill_s=prefill,
            speedup=times["prefill/unpruned"] / prefill,
            ideal_speedup=full_flops.total / pruned_flops.total,
            lm_prefill_s=lm,
            lm_speedup=times["lm/unpruned"] / lm,
            lm_ideal_speedup=full_flops.llm / pruned_flops.llm,
            cue_overhead_s=overhead,
            cue_overhead_pct=None if overhead is None else 100.0 * overhead / prefill,
            peak_bytes=peak[label],
            decode_tokens_per_s=decode[label],
            prefill_tflops=pruned_flops.total / 1e12,
        ))
    return dict(
        family=family.name, size=size, model=family.note.get(size, ""), text_tokens=text_tokens,
        visual_tokens=num_visual, encode_s=bench_utils.median(
            [t for name, values in samples.items() if name.startswith("encode/") for t in values]
        ), repeats=repeats, warmup=warmup,
        decode_steps=decode_steps, device=device, dtype=str(dtype).removeprefix("torch."),
        machine=bench_utils.machine_description(device), rows=rows,
    )


# ----------------------------------------------------------------------------- reporting


def markdown_report(result: dict) -> str:
    header = (
        f"### {result['family']} prefill ({result['size']} size): {result['model']}; "
        f"{result['visual_tokens']} visual + {result['text_tokens']} text tokens, batch 1, "
        f"{result['device']} {result['dtype']}\n\n"
        f"Machine: {result['machine']}. Medians of {result['repeats']} interleaved rounds after "
        f"{result['warmup']} warm-up; decode: {result['decode_steps']} greedy steps. Random weights.\n"
    )
    headers = [
        "setting", "kept / visual", "LLM length", "prefill ms", "speed-up", "FLOPs-ideal", "% of ideal",
        "LLM-only ms", "LLM speed-up (ideal)", "cue+vote ms (% of prefill)", "peak MB", "decode tok/s",
    ]
    rows = []
    for r in result["rows"]:
        overhead = "-" if r["cue_overhead_s"] is None else f"{1e3 * r['cue_overhead_s']:.1f} ({r['cue_overhead_pct']:.1f}%)"
        rows.append([
            r["setting"], f"{r['kept']} / {r['visual_tokens']}", r["lm_length"], f"{1e3 * r['prefill_s']:.1f}",
            f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", f"{100 * r['speedup'] / r['ideal_speedup']:.0f}%",
            f"{1e3 * r['lm_prefill_s']:.1f}", f"{r['lm_speedup']:.2f}x ({r['lm_ideal_speedup']:.2f}x)", overhead,
            bench_utils.megabytes(r["peak_bytes"]), f"{r['decode_tokens_per_s']:.1f}",
        ])
    return header + "\n" + bench_utils.markdown_table(headers, rows) + "\n"


def plot_speedups(results: list[dict], path: str | Path) -> None:
    """Speed-up vs kept visual tokens, measured and FLOPs-ideal, whole prefill and LLM only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for axis, result in zip(axes[0], results):
        rows = [r for r in result["rows"] if r["setting"] != "unpruned"]
        kept = [r["kept"] for r in rows]
        axis.plot(kept, [r["ideal_speedup"] for r in rows], "k--", marker="o", label="FLOPs-ideal (whole prefill)")
        axis.plot(kept, [r["speedup"] for r in rows], "C0-", marker="o", label="measured (whole prefill)")
        axis.plot(kept, [r["lm_ideal_speedup"] for r in rows], "C1--", marker="s", label="FLOPs-ideal (LLM only)")
        axis.plot(kept, [r["lm_speedup"] for r in rows], "C1-", marker="s", label="measured (LLM only)")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xlabel(f"visual tokens kept (of {result['visual_tokens']})")
        axis.set_ylabel("prefill speed-up over unpruned")
        axis.set_title(f"{result['family']} ({result['size']} size, {result['device']})")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description="MFPruner prefill benchmark (unpruned vs the paper's budgets)")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="repeatable; default: all")
    parser.add_argument("--size", choices=SIZES, default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 1 round: seconds (CI)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output-dir", help="write prefill_<family>_<size>_<device>.md / .json here")
    parser.add_argument("--plot", help="write the speed-up plot (png) here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.repeats, args.warmup, args.decode_steps = "smoke", 1, 0, 2
    if args.repeats < 1 or args.warmup < 0 or args.decode_steps < 1:
        raise ValueError("`--repeats` and `--decode-steps` must be >= 1 and `--warmup` >= 0")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("`--device cuda` was asked for but torch sees no CUDA device")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"`--threads` must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    results = []
    for key in args.family or sorted(FAMILIES):
        result = run_family(
            FAMILIES[key], args.size, args.repeats, args.warmup, args.decode_steps, args.device, DTYPES[args.dtype]
        )
        result["key"] = key
        results.append(result)
        report = markdown_report(result)
        print(report)
        if args.output_dir:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            stem = f"prefill_{key}_{args.size}_{torch.device(args.device).type}"
            (out / f"{stem}.md").write_text(report)
            (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_speedups(results, args.plot)
    return results


if __name__ == "__main__":
    main()
