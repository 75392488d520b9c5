"""Qwen2.5-VL-7B vision geometry on CPU: the chunked attention cue against a materialised one,
and the language model's prefill unpruned vs pruned at the paper's three ratios, in one run.

    python -m tools.benchmark_qwen_cue [--sizes 1024 2048] [--vision-depth 4] [--text-layers 1]

Random weights at the real widths (vision: 1280 wide, 16 heads, 14 px patches, 2x2 merge,
112 px windows; language model: 3584 wide, 28 heads, 4 KV heads, 18944 MLP), with fewer layers
than the real 32 vision blocks / 28 decoder layers so it runs on a small CPU: the last vision
block is full attention (where cue A is read), the others windowed. Times are one run each,
after one warm-up of the smallest case; ratios between columns are what to read.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from transformers import Qwen2VLImageProcessor
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

from configuration_mfpruner import MFPrunerQwen2_5_VLConfig
from mfpruner_core import call_budget
from modeling_mfpruner_qwen2_5_vl import (
    MFPrunerQwen2_5_VLForConditionalGeneration,
    last_full_attention_block,
    received_attention_per_patch,
)

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 1000, 1001, 1002, 1003
RATIOS = (0.444, 0.333, 0.222)  # the paper's Qwen2.5-VL settings: prune 55.5 / 66.7 / 77.8 %


def build_model(vision_depth: int, text_layers: int) -> MFPrunerQwen2_5_VLForConditionalGeneration:
    config = MFPrunerQwen2_5_VLConfig(
        vision_config=dict(
            depth=vision_depth, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=[vision_depth - 1],
        ),
        text_config=dict(
            vocab_size=1024, hidden_size=3584, intermediate_size=18944, num_hidden_layers=text_layers,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
            bos_token_id=None, eos_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    torch.manual_seed(0)
    return MFPrunerQwen2_5_VLForConditionalGeneration(config).eval()


def image_inputs(side: int) -> dict:
    """A side x side image through the 7B repo's image processor (max 12845056 pixels), in a prompt."""
    processor = Qwen2VLImageProcessor(size={"shortest_edge": 3136, "longest_edge": 12845056})
    image = Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8))
    pixels = processor(images=[image], return_tensors="pt")
    tokens = int(pixels["image_grid_thw"].prod() // 4)
    text = torch.randint(0, 900, (24,), generator=torch.Generator().manual_seed(side))
    ids = torch.cat([text[:4], torch.tensor([VISION_START]), torch.full((tokens,), IMAGE_TOKEN),
                     torch.tensor([VISION_END]), text[4:]])[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels}


def timed_peak(fn):
    """(result, seconds, peak CPU bytes allocated while fn runs, from the profiler's records)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return result, seconds, peak


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def materialised_received(attn, hidden, cu_seqlens, position_embeddings):
    """The whole (H, n, n) attention map per segment, then its column sums (the reference)."""
    length = hidden.shape[0]
    q, k, _ = attn.qkv(hidden).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    out = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        weights = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]).mul_(attn.scaling).softmax(dim=-1)
        out.append(weights.sum(dim=1).mean(dim=0))
    return torch.cat(out)


def run_size(model, side: int, max_materialised_gb: float, chunk: int) -> dict:
    inputs = image_inputs(side)
    visual = model.model.visual
    attn = visual.blocks[last_full_attention_block(visual)].attn
    captured = {}
    handle = attn.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(hidden=args[0], **kwargs), with_kwargs=True
    )
    with torch.no_grad():  # the tower once, with the cue hook: the pruning path as it runs
        encoded, encode_s = timed(lambda: model.encode_prompt(**inputs))
    handle.remove()
    patches = captured["hidden"].shape[0]
    row = {"side": side, "patches": patches, "tokens": patches // 4, "encode_s": encode_s}

    cue_args = (attn, captured["hidden"], captured["cu_seqlens"], captured["position_embeddings"])
    with torch.no_grad():
        chunked, row["cue_chunked_s"], row["cue_chunked_peak"] = timed_peak(
            lambda: received_attention_per_patch(*cue_args, chunk)
        )
        full_map = attn.num_heads * patches * patches * 4
        row["full_map_bytes"] = full_map
        if full_map <= max_materialised_gb * 2**30:
            reference, row["cue_full_s"], row["cue_full_peak"] = timed_peak(lambda: materialised_received(*cue_args))
            row["cue_max_diff"] = float((reference - chunked).abs().max())

        budget_ratio = [(None, 1.0)] + [call_budget(None, None, ratio=r) for r in RATIOS]
        for budget, ratio in budget_ratio:
            if ratio == 1.0:  # unpruned: the stock positions and the whole prompt
                lm_inputs = {
                    "inputs_embeds": encoded["inputs_embeds"],
                    "attention_mask": encoded["attention_mask"],
                    "position_ids": torch.cat([torch.arange(inputs["input_ids"].shape[1])[None, None],
                                               encoded["positions"]]),
                }
                select_s = 0.0
            else:
                pruned, select_s = timed(lambda: model.select_and_compact(encoded, budget, ratio))
                lm_inputs = {k: pruned[k] for k in ("inputs_embeds", "attention_mask", "position_ids")}
            _, prefill_s = timed(lambda: model(**lm_inputs, use_cache=False, logits_to_keep=1))
            row[f"len@{ratio}"] = lm_inputs["inputs_embeds"].shape[1]
            row[f"prefill@{ratio}"] = prefill_s
            row[f"select@{ratio}"] = select_s
    return row


def report(rows, args):
    gib = 2**30
    for row in rows:
        print(f"\n{row['side']}x{row['side']} image: {row['patches']} patches -> {row['tokens']} visual tokens")
        print(f"  vision tower ({args.vision_depth} blocks) + cue A + M-RoPE positions: {row['encode_s']:.2f} s")
        print(f"  cue A chunked:      {row['cue_chunked_s']:.2f} s, peak {row['cue_chunked_peak'] / gib:.3f} GiB")
        if "cue_full_s" in row:
            print(f"  cue A materialised: {row['cue_full_s']:.2f} s, peak {row['cue_full_peak'] / gib:.3f} GiB "
                  f"(max |diff| {row['cue_max_diff']:.1e}); chunked/materialised time "
                  f"{row['cue_chunked_s'] / row['cue_full_s']:.2f}x, memory "
                  f"{row['cue_chunked_peak'] / row['cue_full_peak']:.3f}x")
        else:
            print(f"  cue A materialised: not run, one (heads, N, N) float32 map alone is "
                  f"{row['full_map_bytes'] / gib:.1f} GiB")
        base = row["prefill@1.0"]
        print(f"  LLM prefill ({args.text_layers} layer(s)):  " + "   ".join(
            f"keep {ratio:.3f}: {row[f'len@{ratio}']} tok {row[f'prefill@{ratio}']:.2f} s "
            f"({base / row[f'prefill@{ratio}']:.2f}x)" for ratio in (1.0, *RATIOS)))
        votes = ", ".join(f"{row[f'select@{r}'] * 1000:.0f} ms @ {r}" for r in RATIOS)
        print(f"  vote + compaction: {votes}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--text-layers", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=256, help="queries per step of the chunked cue")
    parser.add_argument("--max-materialised-gb", type=float, default=4.0,
                        help="skip the materialised cue when one attention map would exceed this")
    args = parser.parse_args(argv)
    model = build_model(args.vision_depth, args.text_layers)
    model.config.attention_query_chunk = args.chunk
    run_size(model, 224, args.max_materialised_gb, args.chunk)  # warm-up
    print(f"Qwen2.5-VL-7B geometry, random weights, CPU ({torch.get_num_threads()} threads), "
          f"{args.vision_depth} vision block(s) (the last one full attention), {args.text_layers} decoder layer(s), "
          f"query chunk {args.chunk}", flush=True)
    for side in args.sizes:  # one size at a time, printed as soon as it is measured
        report([run_size(model, side, args.max_materialised_gb, args.chunk)], args)


if __name__ == "__main__":
    main()
