"""Cue benchmark: MFPruner's cue computations against the straightforward ones, same inputs.

  uniqueness        closed form O(N D) (`mfpruner_core.uniqueness`)
                    vs the N x N cosine-similarity matrix;
  [CLS] attention   SDPA vision tower + hooks on the select layer's q/k projections
                    (`capture_clip_select_layer` + `clip_cls_attention`)
                    vs an eager tower asked for `output_attentions=True`;
  attention received (Qwen2.5-VL) query-chunked column sums (`mfpruner_core.attention_received`)
                    vs the materialised (heads, N, N) softmax map.

Each at N = 576 (LLaVA-1.5), 2,928 (LLaVA-NeXT, 672x672) and 16,384 (a 1792x1792 image's
patches in Qwen2.5-VL's vision tower). Time: medians of interleaved rounds. Memory: peak tensor
memory allocated during the call (mfpruner_lib.bench_utils). A straightforward version whose predicted
peak exceeds `--max-naive-gb` is not run; the table gives its predicted size instead. Every pair
that runs is checked to agree (max |difference|).

    python -m tools.benchmark_cues --output benchmarks/cues_cpu.md [--query-chunk 256]

Section "attention-7b" (Qwen2.5-VL's cue A at the 7B vision width: 1280 wide, 16 heads of 80), for
a 1024x1024 (5,476 patches) and a 2048x2048 image (21,316 patches) in the full-attention block:
  stock         the block's attention as the stock model runs it (scaled_dot_product_attention);
  two-pass      that plus today's separate cue pass (`attention_received` on the same q, k);
  one-pass      `attention_with_received` (the output and the cue together; method "auto", and
                each method by name), checked against SDPA's output and the two-pass cue;
  block forward one whole stock Qwen2.5-VL vision block (attention, MLP, norms) on the same input:
                the target is cue cost (one-pass minus stock) <= one block forward.

    python -m tools.benchmark_cues --section attention-7b --device cuda --dtype bfloat16

Qwen2.5-VL's own images fall in the same two regimes as the rows here: a 1024x1024 image has
5,476 patches in the full-attention block (a (16, N, N) map of 1.9 GB still fits, like N = 2,928),
a 2048x2048 one 21,316 (27 GB, like N = 16,384: only the chunked cue runs). `--query-chunk` sets
the queries per step (the model's `attention_query_chunk`, 256 by default there; on CPU at most
`mfpruner_core.CPU_QUERY_CHUNK`): the largest temporary is heads x chunk x N floats (on CPU one
head per thread), so a smaller chunk trades a little time for memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from mfpruner_core import (
    attention_received, attention_with_received, min_max_normalize, queries_per_block, top_k_mask, uniqueness
)
from modeling_mfpruner_llava import capture_clip_select_layer, clip_cls_attention
from mfpruner_lib import bench_utils
from mfpruner_lib.cli import ArgumentParser, refusals_as_errors

FLOAT = 4  # bytes


@dataclass(frozen=True)
class Case:
    """One token count: N, the CLIP tiles that make it (N = tiles x patches), widths."""

    label: str
    n: int
    tiles: int
    image_size: int  # CLIP tile side (px, 14 px patches)
    feature_dim: int  # uniqueness features
    clip_width: int
    clip_heads: int
    qwen_heads: int
    qwen_head_dim: int
    rounds: tuple[int, int] | None = None  # (repeats, warm-up) instead of the command line's: big cases


# CLIP: the ViT-L width (1024, 16 heads) but ONE encoder layer (per-layer costs; maps of every
# layer are kept by output_attentions, so the naive memory grows with depth: see the table note).
# N = 16,384 as CLIP tiles: 28 tiles of 576 patches (16,128), the tower attends per tile.
FULL_CASES = (
    Case("576 (LLaVA-1.5)", 576, 1, 336, 1024, 1024, 16, 16, 80),
    Case("2,928 (LLaVA-NeXT 672 px; CLIP: 5 tiles)", 2928, 5, 336, 1024, 1024, 16, 16, 80),
    Case("16,384 (Qwen2.5-VL 1792 px; CLIP: 28 tiles)", 16384, 28, 336, 1024, 1024, 16, 16, 80, rounds=(1, 0)),
)
SMOKE_CASES = (
    Case("16 (smoke)", 16, 1, 56, 32, 32, 4, 4, 8),
    Case("64 (smoke)", 64, 4, 56, 32, 32, 4, 4, 8),
)


# ----------------------------------------------------------------------------- straightforward cues


def uniqueness_naive(features: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N): 1 - mean cosine similarity, from the full (B, N, N) matrix."""
    x = F.normalize(features.float(), dim=-1)
    similarity = x @ x.transpose(1, 2)  # (B, N, N)
    similarity.diagonal(dim1=1, dim2=2).zero_()
    return 1.0 - similarity.mean(dim=-1)


def cls_attention_naive(eager_tower, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """Eager attention maps of every layer, then the [CLS] row of one: (B, N), min-max normalised."""
    maps = eager_tower(pixel_values=pixel_values, output_attentions=True).attentions  # per layer (B, H, T, T)
    return min_max_normalize(maps[layer][:, :, 0, 1:].mean(dim=1))


def cls_attention_hooked(tower, pixel_values: torch.Tensor, select_layer: int) -> torch.Tensor:
    with capture_clip_select_layer(tower, select_layer) as captured:
        tower(pixel_values=pixel_values)
    return min_max_normalize(clip_cls_attention(captured, tower.encoder.layers[0].self_attn.scale, keep_cls=False))


def attention_received_naive(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(H, N, Dh) -> (N,): the whole (H, N, N) softmax map, column sums, mean over heads."""
    probs = (q.float() @ k.float().transpose(1, 2) * scale).softmax(dim=-1)  # (H, N, N)
    return probs.sum(dim=1).mean(dim=0)


# ----------------------------------------------------------------------------- predicted naive peaks


def predicted_naive_bytes(case: Case) -> dict[str, int]:
    """Lower bounds of the straightforward versions' peaks: the big temporaries they must hold."""
    tokens = case.image_size // 14
    t = tokens * tokens + 1
    return {
        "uniqueness": case.n * case.n * FLOAT,  # the (N, N) matrix
        "cls_attention": 2 * case.tiles * case.clip_heads * t * t * FLOAT,  # logits + softmax of one layer
        "attention_received": 2 * case.qwen_heads * case.n * case.n * FLOAT,  # logits + softmax
    }


VIT_L_LAYERS = 24


def attention_maps_bytes(case: Case, layers: int = VIT_L_LAYERS) -> int:
    """What `output_attentions=True` returns for a CLIP tower of `layers` layers: one
    (tiles, heads, T, T) float32 map per layer, all alive at once (exact tensor sizes)."""
    t = (case.image_size // 14) ** 2 + 1
    return layers * case.tiles * case.clip_heads * t * t * FLOAT


def full_depth_note(cases) -> str:
    sizes = ", ".join(f"{c.label.split(' ')[0]}: {bench_utils.megabytes(attention_maps_bytes(c))} MB" for c in cases)
    return (
        f"\nThe [CLS] rows above run ONE layer. At ViT-L's {VIT_L_LAYERS} "
        f"layers, `output_attentions=True` also returns every layer's map, all alive at once (exact tensor "
        f"sizes): {sizes}; the hooks keep one [CLS] query row and one layer's keys whatever the depth.\n"
    )


# ----------------------------------------------------------------------------- attention-7b: cue A at the 7B width

QWEN_7B_ATTENTION = dict(hidden_size=1280, num_heads=16, intermediate_size=3420)
ATTENTION_7B_PATCHES = {"1024x1024": 5476, "2048x2048": 21316}  # 74 x 74 and 146 x 146 patches of 14 px
ATTENTION_SMOKE_PATCHES = {"smoke 8x8": 64, "smoke 12x12": 144}


def qwen_vision_block(width: int, heads: int, intermediate: int, dtype: torch.dtype, device: str):
    """One stock Qwen2.5-VL vision block (SDPA), random weights."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionBlock

    config = Qwen2_5_VLConfig(vision_config=dict(hidden_size=width, num_heads=heads, intermediate_size=intermediate,
                                                 hidden_act="silu")).vision_config
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        block = Qwen2_5_VLVisionBlock(config)
    return block.to(dtype).eval()


def block_inputs(block, length: int, generator, device: str, dtype: torch.dtype):
    """Hidden states, cu_seqlens (one segment), rotary (cos, sin) and the attention's q, k, v
    (1, H, S, Dh) after rotary, as the hooked block computes them."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    attn = block.attn
    hidden, cu_seqlens, rotary = bench_utils.vision_attention_inputs(attn, length, generator, device, dtype)
    q, k, v = attn.qkv(block.norm1(hidden)).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *rotary)
    q, k, v = (x.transpose(0, 1)[None].contiguous() for x in (q, k, v))
    return hidden, cu_seqlens, rotary, (q, k, v)


def run_attention_7b(patches: dict[str, int], repeats: int, warmup: int, device: str, dtype: torch.dtype,
                     query_chunk: int, width: int, heads: int, intermediate: int, big_rounds=(1, 0), seed: int = 0):
    """Per image size: times (min / median / max) and peaks of the stock attention, the two-pass
    cue, attention_with_received (auto and each method) and one block forward; agreement checks."""
    generator = torch.Generator().manual_seed(seed)
    block = qwen_vision_block(width, heads, intermediate, dtype, device)
    scale = block.attn.scaling
    rows = []
    with torch.inference_mode():
        for label, length in patches.items():
            hidden, cu_seqlens, rotary, (q, k, v) = block_inputs(block, length, generator, device, dtype)
            calls = {
                "stock attention": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
                "two-pass": lambda: (F.scaled_dot_product_attention(q, k, v, scale=scale),
                                     attention_received(q[0], k[0], scale, query_chunk)),
                "one-pass (auto)": lambda: attention_with_received(q, k, v, scale, query_chunk),
                "one-pass chunked": lambda: attention_with_received(q, k, v, scale, query_chunk, "chunked"),
                "one-pass fused": lambda: attention_with_received(q, k, v, scale, query_chunk, "fused"),
                "block forward": lambda: block(hidden, cu_seqlens=cu_seqlens, position_embeddings=rotary),
            }
            errors, results = {}, {}
            for name, call in list(calls.items()):  # a method that fails here is reported, not fatal
                try:
                    results[name] = call()
                except Exception as error:  # noqa: BLE001 - report any kernel / dispatch failure
                    errors[name] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
                    del calls[name]
            rounds = big_rounds if length > 10_000 and big_rounds else (repeats, warmup)
            samples = bench_utils.time_interleaved(calls, rounds[0], rounds[1], device)
            peaks = {name: bench_utils.peak_memory(call, device)[0] for name, call in calls.items()}
            reference_out = results["stock attention"].float()
            reference_received = results["two-pass"][1] if "two-pass" in results else None
            budget = max(1, round(0.222 * length))
            for name in calls:
                row = dict(label=label, patches=length, method=name, spread_s=bench_utils.spread(samples[name]),
                           peak_bytes=peaks[name], rounds=rounds)
                if name.startswith("one-pass") and reference_received is not None:
                    out, received = results[name]
                    row["max_abs_diff_out"] = float((out.float() - reference_out).abs().max())
                    row["max_rel_diff_received"] = float(((received[0] - reference_received).abs()
                                                          / reference_received.abs().clamp(min=1e-12)).max())
                    row["same_top_22_2pct"] = bool(torch.equal(top_k_mask(received, budget),
                                                               top_k_mask(reference_received[None], budget)))
                rows.append(row)
            for name, error in errors.items():
                rows.append(dict(label=label, patches=length, method=name, error=error))
            del hidden, q, k, v, results
    return rows


def chunk_note(query_chunk: int, device: str) -> str:
    """How many queries the chunked cue takes per block, as the tables say it."""
    used = queries_per_block(query_chunk, device)
    if used == query_chunk:
        return f"query chunks of {query_chunk:,}"
    return f"query chunks of {used:,} (`--query-chunk` {query_chunk:,}, capped at `CPU_QUERY_CHUNK` on CPU)"


def attention_7b_report(rows: list[dict], machine: str, device: str, dtype: torch.dtype, query_chunk: int,
                        width: int, heads: int) -> str:
    header = (
        f"### Qwen2.5-VL cue A at the vision width {width} ({heads} heads of {width // heads}), {device} "
        f"{str(dtype).removeprefix('torch.')}\n\n"
        f"Machine: {machine}. Times: median (min-max) of interleaved rounds (rounds per row). cue cost = the "
        "method's time minus the stock attention's (medians); target: <= one block forward. two-pass = the "
        f"stock attention + `attention_received` ({chunk_note(query_chunk, device)}), what the model does "
        "without the one-pass function. Diffs: output vs SDPA (max abs), "
        "received vs the two-pass cue (max relative), and whether the top 22.2% tokens agree.\n"
    )
    headers = ["image (patches)", "method", "ms", "cue cost ms", "cue cost / block forward", "peak MB",
               "out diff", "received diff", "same top 22.2%"]
    table = []
    for label in dict.fromkeys(r["label"] for r in rows):
        group = [r for r in rows if r["label"] == label]
        timed = {r["method"]: r["spread_s"]["median"] for r in group if "spread_s" in r}
        stock, block = timed.get("stock attention"), timed.get("block forward")
        for r in group:
            name = f"{label} ({r['patches']:,})"
            if "error" in r:
                table.append([name, r["method"], "failed: " + r["error"].replace("|", "/"), "-", "-", "-", "-", "-", "-"])
                continue
            t = r["spread_s"]
            cue = None if stock is None or r["method"] in ("stock attention", "block forward") else t["median"] - stock
            table.append([
                name, r["method"], f"{1e3 * t['median']:.1f} ({1e3 * t['min']:.1f}-{1e3 * t['max']:.1f})",
                "-" if cue is None else f"{1e3 * cue:.1f}",
                "-" if cue is None or not block else f"{cue / block:.2f}",
                bench_utils.megabytes(r["peak_bytes"]),
                f"{r['max_abs_diff_out']:.1e}" if "max_abs_diff_out" in r else "-",
                f"{r['max_rel_diff_received']:.1e}" if "max_rel_diff_received" in r else "-",
                str(r["same_top_22_2pct"]) if "same_top_22_2pct" in r else "-",
            ])
    return header + "\n" + bench_utils.markdown_table(headers, table) + "\n"


# ----------------------------------------------------------------------------- running


def clip_towers(case: Case, seed: int):
    """An SDPA and an eager one-layer CLIP tower with the same weights."""
    config = CLIPVisionConfig(
        hidden_size=case.clip_width, intermediate_size=4 * case.clip_width, num_hidden_layers=1,
        num_attention_heads=case.clip_heads, image_size=case.image_size, patch_size=14,
    )
    torch.manual_seed(seed)
    fast = CLIPVisionModel._from_config(config, attn_implementation="sdpa").eval()
    eager = CLIPVisionModel._from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(fast.state_dict())
    return fast, eager


def compare(name: str, naive, ours, predicted: int, max_naive_bytes: int, repeats: int, warmup: int, device: str):
    """Times both (interleaved), measures their peaks, checks they agree. naive=None when too big."""
    run_naive = predicted <= max_naive_bytes
    calls = {"ours": ours, **({"naive": naive} if run_naive else {})}
    samples = bench_utils.time_interleaved(calls, repeats, warmup, device)
    ours_peak, ours_result = bench_utils.peak_memory(ours, device)
    row = dict(cue=name, predicted_naive_bytes=predicted, naive_run=run_naive,
               ours_s=bench_utils.median(samples["ours"]), ours_peak=ours_peak)
    if run_naive:
        naive_peak, naive_result = bench_utils.peak_memory(naive, device)
        row.update(
            naive_s=bench_utils.median(samples["naive"]),
            naive_peak=naive_peak,
            max_abs_diff=float((naive_result.float() - ours_result.float()).abs().max()),
        )
    return row


def run_case(case: Case, repeats: int, warmup: int, max_naive_bytes: int, device: str, query_chunk: int = 1024,
             seed: int = 0) -> list[dict]:
    repeats, warmup = case.rounds or (repeats, warmup)
    generator = torch.Generator().manual_seed(seed)
    predicted = predicted_naive_bytes(case)
    rows = []
    with torch.inference_mode():
        features = torch.randn(1, case.n, case.feature_dim, generator=generator).to(device)
        rows.append(compare(
            "uniqueness", lambda: uniqueness_naive(features), lambda: uniqueness(features),
            predicted["uniqueness"], max_naive_bytes, repeats, warmup, device,
        ))

        fast, eager = (tower.to(device) for tower in clip_towers(case, seed))
        pixels = torch.randn(case.tiles, 3, case.image_size, case.image_size, generator=generator).to(device)
        rows.append(compare(
            "[CLS] attention", lambda: cls_attention_naive(eager, pixels, layer=0),
            lambda: cls_attention_hooked(fast, pixels, select_layer=-1),
            predicted["cls_attention"], max_naive_bytes, repeats, warmup, device,
        ))
        del fast, eager

        q = torch.randn(case.qwen_heads, case.n, case.qwen_head_dim, generator=generator).to(device)
        k = torch.randn(case.qwen_heads, case.n, case.qwen_head_dim, generator=generator).to(device)
        scale = case.qwen_head_dim**-0.5
        rows.append(compare(
            "attention received", lambda: attention_received_naive(q, k, scale), lambda: attention_received(q, k, scale, query_chunk),
            predicted["attention_received"], max_naive_bytes, repeats, warmup, device,
        ))
    for row in rows:
        row["n"], row["label"], row["rounds"] = case.n, case.label, (repeats, warmup)
    return rows


def markdown_report(rows: list[dict], cases, machine: str, repeats: int, warmup: int, max_naive_gb: float,
                    query_chunk: int = 1024, device: str = "cpu") -> str:
    c = cases[0]
    header = (
        "### Cues: ours vs straightforward\n\n"
        f"Machine: {machine}. Medians of {repeats} interleaved rounds after {warmup} warm-up. Peak = tensor "
        "memory allocated during the call above what was live before it. "
        f"Uniqueness on (N, {c.feature_dim}) features. [CLS] attention in a ONE-layer CLIP tower "
        f"({c.clip_width} wide, {c.clip_heads} heads) on tiles of {c.image_size} px "
        f"({(c.image_size // 14) ** 2} patches each; N = tiles x patches, so 2,928 -> 5 tiles = 2,880, "
        "16,384 -> 28 tiles = 16,128); output_attentions keeps every layer's maps, x24 for ViT-L. "
        f"Attention received with {c.qwen_heads} heads x {c.qwen_head_dim} (Qwen2.5-VL's vision attention), "
        f"{chunk_note(query_chunk, device)}. Straightforward versions predicted above {max_naive_gb:g} GB are not run "
        "(predicted lower bound shown)."
        + "".join(f" {c.label}: {c.rounds[0]} round(s), {c.rounds[1]} warm-up." for c in cases if c.rounds)
        + "\n"
    )
    headers = ["cue", "N", "ours ms", "straightforward ms", "time ratio", "ours peak MB", "straightforward peak MB",
               "memory ratio", "max abs diff"]
    table = []
    for r in rows:
        if r["naive_run"]:
            naive_ms = f"{1e3 * r['naive_s']:.1f}"
            time_ratio = f"{r['naive_s'] / r['ours_s']:.1f}x"
            naive_peak = bench_utils.megabytes(r["naive_peak"])
            memory_ratio = f"{r['naive_peak'] / max(r['ours_peak'], 1):.1f}x"
            diff = f"{r['max_abs_diff']:.1e}"
        else:
            naive_ms, time_ratio, diff = "not run", "-", "-"
            naive_peak = f">= {bench_utils.megabytes(r['predicted_naive_bytes'])} (predicted)"
            memory_ratio = f">= {r['predicted_naive_bytes'] / max(r['ours_peak'], 1):.0f}x"
        table.append([r["cue"], r["label"], f"{1e3 * r['ours_s']:.1f}", naive_ms, time_ratio,
                      bench_utils.megabytes(r["ours_peak"]), naive_peak, memory_ratio, diff])
    return header + "\n" + bench_utils.markdown_table(headers, table) + "\n" + full_depth_note(cases)


SECTIONS = ("cues", "attention-7b")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@refusals_as_errors
def main(argv=None) -> list[dict]:
    parser = ArgumentParser(description="MFPruner cues vs straightforward implementations")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round: seconds (CI)")
    parser.add_argument("--section", action="append", choices=SECTIONS, help="repeatable; default: all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-naive-gb", type=float, default=4.0, help="skip straightforward runs predicted above this")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="attention-7b only")
    parser.add_argument("--query-chunk", type=int, default=1024,
                        help="queries per step of the chunked attention received (the Qwen model's default: 256)")
    parser.add_argument("--big-rounds", type=int, nargs=2, default=(1, 0), metavar=("REPEATS", "WARMUP"),
                        help="attention-7b rounds for the 2048x2048 image (21,316 patches)")
    parser.add_argument("--output", help="write the markdown tables here")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--docs", help="also write each table into this markdown page between the markers "
                        "<!-- BEGIN cues DEVICE --> / <!-- BEGIN attention-7b DEVICE DTYPE --> (e.g. docs/benchmarks.md)")
    bench_utils.add_load_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.warmup = 1, 0
    if args.repeats < 1 or args.warmup < 0 or args.max_naive_gb <= 0 or args.query_chunk < 1:
        raise ValueError("`--repeats` and `--query-chunk` must be >= 1, `--warmup` >= 0 and `--max-naive-gb` > 0")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("`--device cuda` was asked for but torch sees no CUDA device")
    sections, device = args.section or list(SECTIONS), torch.device(args.device).type
    machine = bench_utils.machine_description(args.device)
    reports, all_rows = {}, []
    with bench_utils.LoadMonitor() as load:
        if "cues" in sections:
            rows, cases = [], SMOKE_CASES if args.smoke else FULL_CASES
            for case in cases:
                rows += run_case(case, args.repeats, args.warmup, int(args.max_naive_gb * 2**30), args.device,
                                 args.query_chunk)
            rows.sort(key=lambda r: (r["cue"], r["n"]))
            reports[f"cues {device}"] = markdown_report(rows, cases, machine, args.repeats, args.warmup,
                                                        args.max_naive_gb, args.query_chunk, device)
            all_rows += rows
        if "attention-7b" in sections:
            dtype = DTYPES[args.dtype]
            sizes = (ATTENTION_SMOKE_PATCHES, 32, 4, 64) if args.smoke else (
                ATTENTION_7B_PATCHES, QWEN_7B_ATTENTION["hidden_size"], QWEN_7B_ATTENTION["num_heads"],
                QWEN_7B_ATTENTION["intermediate_size"])
            patches, width, heads, intermediate = sizes
            rows = run_attention_7b(patches, args.repeats, args.warmup, args.device, dtype, args.query_chunk, width,
                                    heads, intermediate, None if args.smoke else tuple(args.big_rounds))
            reports[f"attention-7b {device} {args.dtype}"] = attention_7b_report(
                rows, machine, args.device, dtype, args.query_chunk, width, heads)
            all_rows += rows
    busy = None
    try:
        bench_utils.check_quiet(load, args.force, args.max_load, args.max_other_cores)
    except bench_utils.MachineBusy as error:
        busy = error
    reports = {key: f"{report}\n{bench_utils.describe_load(load)}\n" for key, report in reports.items()}
    print("\n".join(reports.values()))
    if busy is not None:  # printed for a look, never written
        raise busy
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("\n".join(reports.values()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        record = dict(machine=machine, load=bench_utils.load_record(load), rows=all_rows)
        Path(args.json).write_text(json.dumps(record, indent=2, default=str) + "\n")
    if args.docs:
        for key, report in reports.items():
            bench_utils.write_between_markers(args.docs, key, report)
    return all_rows


if __name__ == "__main__":
    main()
