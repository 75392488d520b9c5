"""The Python steps of `bash tools/gpu_check.sh` that are not benchmark scripts of their own.

    python -m tools.gpu_check device-map --out DIR [--size cpu] [--device cuda]
        A model saved with its remote code, loaded three times through from_pretrained: all on
        the GPU, all on the CPU, and split (vision tower + projector on the CPU, the language
        model and LM head on the GPU). One pruning forward and a short greedy generate() each;
        the split run must keep the same visual tokens and give the same logits and tokens as the
        others. Writes DIR/device_map.json; exits 1 when a check fails.
    python -m tools.gpu_check kernels --device cuda [--append FILE]
        `attention_with_received` on the device, every method x dtype (float32 / bfloat16 /
        float16) against the float64 materialised softmax at small sizes: the output and the
        column sums (max errors), and whether the kept top 22.2% agree. Appends a table to FILE.
    python -m tools.gpu_check summary --work DIR --out DIR
        Merges the per-family prefill results into prefill.md / prefill.json, adds the comparison
        with the FLOPs-ideal and the paper's 3.42x (LLaVA-1.5-7B, 32 tokens), draws the plot.

    python -m tools.gpu_check docs --results benchmarks/gpu-NAME --docs docs/benchmarks.md
        Writes the committed GPU results (summary.md, prefill.md, cues.md) into the docs page
        between the markers <!-- BEGIN gpu NAME FILE --> / <!-- END ... -->.

Only public entry points of the models are used (from_pretrained, forward, generate,
last_pruning), so the check keeps working when the model files change their internals.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from mfpruner_lib.cli import ArgumentParser, refusals_as_errors
from mfpruner_lib.families import FAMILIES

PAPER_SPEEDUP_32 = 3.42  # the paper's LLaVA-1.5-7B prefill speed-up at 32 of 576 tokens
VISION_PARTS = ("vision", "visual", "projector", "image_newline")  # submodule names that form the vision side


# ----------------------------------------------------------------------------- device map


def split_device_map(model, gpu) -> dict:
    """{submodule name: device}: every vision-side child of the inner model (tower, projector,
    LLaVA-NeXT's newline) on the CPU, everything else (language model, LM head) on `gpu`.
    Built from the module tree, so it follows renamed internals."""
    inner_name, inner = next((name, child) for name, child in model.named_children() if name == "model")
    mapping = {}
    for name, _ in list(inner.named_children()) + [(n, None) for n, _ in inner.named_parameters(recurse=False)]:
        on_cpu = any(part in name for part in VISION_PARTS)
        mapping[f"{inner_name}.{name}"] = "cpu" if on_cpu else gpu
    for name, _ in model.named_children():
        if name != inner_name:
            mapping[name] = gpu
    if not any(device == "cpu" for device in mapping.values()):
        raise ValueError(f"no vision-side submodule found in {sorted(mapping)}")
    return mapping


def run_loaded(path, device_map, inputs: dict, budget: dict, new_tokens: int) -> dict:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, device_map=device_map).eval()
    # On `model.device`, as users do (the all-GPU model has no hooks to move them; a split one has).
    inputs = {name: value.to(model.device) if torch.is_tensor(value) else value for name, value in inputs.items()}
    with torch.inference_mode():
        logits = model(**inputs, **budget).logits.float().cpu()
        kept = [idx.tolist() for idx in model.last_pruning.keep_indices]
        generated = model.generate(**inputs, **budget, max_new_tokens=new_tokens, do_sample=False)
    placement = sorted({str(p.device) for p in model.parameters()})
    del model
    return dict(logits=logits, kept=kept, generated=generated.cpu().tolist(), placement=placement)


def check_device_map(family_key: str, size: str, gpu: str, work: Path, new_tokens: int = 4) -> dict:
    """One family: build + save, then all-GPU / all-CPU / split runs compared."""
    from tools import benchmark_prefill

    family = benchmark_prefill.FAMILIES[family_key]
    torch.manual_seed(0)
    model = family.build(size, torch.float32, "cpu")
    path = work / f"{family_key}-{size}"
    model.save_pretrained(path)
    inputs = family.inputs(model, size, 0, "cpu", family.text_tokens[size])
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    label, budget = family.budgets(num_visual)[-1]  # the smallest budget
    split = split_device_map(model, gpu)
    del model

    runs = {}
    for name, device_map in (("all_gpu", {"": gpu}), ("all_cpu", {"": "cpu"}), ("split", split)):
        start = time.perf_counter()
        runs[name] = run_loaded(path, device_map, inputs, budget, new_tokens)
        runs[name]["seconds"] = time.perf_counter() - start
    record = dict(family=family.name, size=size, budget=label, visual_tokens=num_visual, split_map=split, checks={})
    for reference in ("all_gpu", "all_cpu"):
        ref, got = runs[reference], runs["split"]
        same_shape = ref["logits"].shape == got["logits"].shape
        diff = float((ref["logits"] - got["logits"]).abs().max()) if same_shape else float("inf")
        scale = float(ref["logits"].abs().max()) or 1.0
        record["checks"][f"split_vs_{reference}"] = dict(
            same_kept_tokens=ref["kept"] == got["kept"],
            logits_max_abs_diff=diff,
            logits_close=same_shape and diff <= 1e-3 * max(1.0, scale),
            same_generated_tokens=ref["generated"] == got["generated"],
        )
    record["placements"] = {name: run["placement"] for name, run in runs.items()}
    record["seconds"] = {name: round(run["seconds"], 2) for name, run in runs.items()}
    record["kept"] = runs["split"]["kept"]
    record["passed"] = all(
        c["same_kept_tokens"] and c["logits_close"] and c["same_generated_tokens"] for c in record["checks"].values()
    )
    return record


def device_map_main(args) -> int:
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device")
        # TF32 convolutions / matmuls would differ from the CPU by ~1e-3: compare exact float32 math.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    gpu = 0 if args.device == "cuda" else args.device
    results = []
    with tempfile.TemporaryDirectory() as work:
        for key in args.family:
            print(f"[device-map] {key} ({args.size}) ...", flush=True)
            try:
                record = check_device_map(key, args.size, gpu, Path(work))
            except Exception as error:  # noqa: BLE001 - report it, go on with the next family
                traceback.print_exc()
                record = dict(family=key, size=args.size, passed=False, error=f"{type(error).__name__}: {error}")
            print(f"[device-map] {key}: {'PASS' if record['passed'] else 'FAIL'} "
                  f"{json.dumps(record.get('checks', record.get('error')))}", flush=True)
            results.append(record)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_map.json").write_text(json.dumps(dict(device=args.device, results=results), indent=2) + "\n")
    return 0 if all(r["passed"] for r in results) else 1


# ----------------------------------------------------------------------------- kernels


def kernels_main(args) -> int:
    from mfpruner_core import attention_with_received, top_k_mask

    lines = [f"### attention_with_received on {args.device} vs the float64 materialised map\n",
             "| method | dtype | (H, S, Dh) | out max abs err | received max rel err | same top 22.2% | error |",
             "|---|---|---|---|---|---|---|"]
    failed = False
    generator = torch.Generator().manual_seed(0)
    for heads, length, head_dim in ((16, 1000, 80), (4, 333, 64)):
        q, k, v = (torch.randn(1, heads, length, head_dim, generator=generator) for _ in range(3))
        k[:, :, ::7] *= 2.5  # a few salient keys, as in a vision tower
        budget = max(1, round(0.222 * length))
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            # the reference uses the dtype-rounded inputs, so only the kernel's own error is measured
            qd, kd, vd = (x.to(dtype) for x in (q, k, v))
            probs = torch.softmax(qd.double() @ kd.double().transpose(-1, -2) * head_dim**-0.5, dim=-1)
            exact_out, exact_received = probs @ vd.double(), probs.sum(dim=2).mean(dim=1)
            for method in ("chunked", "fused", "auto"):
                shape = f"({heads}, {length}, {head_dim})"
                try:
                    out, received = attention_with_received(*(x.to(args.device) for x in (qd, kd, vd)),
                                                            head_dim**-0.5, 256, method)
                    out, received = out.double().cpu(), received.double().cpu()
                    out_err = float((out - exact_out).abs().max())
                    rec_err = float(((received - exact_received).abs() / exact_received).max())
                    same = bool(torch.equal(top_k_mask(received.float(), budget), top_k_mask(exact_received.float(), budget)))
                    lines.append(f"| {method} | {str(dtype)[6:]} | {shape} | {out_err:.1e} | {rec_err:.1e} | {same} | |")
                    failed |= rec_err > 1e-2 or out_err > (1e-4 if dtype == torch.float32 else 5e-2)
                except Exception as error:  # noqa: BLE001 - report every failing combination
                    lines.append(f"| {method} | {str(dtype)[6:]} | {shape} | - | - | - | {type(error).__name__}: "
                                 f"{str(error).splitlines()[0][:120].replace('|', '/')} |")
                    failed = True
    table = "\n".join(lines) + "\n"
    print(table, flush=True)
    if args.append:
        with open(args.append, "a") as handle:
            handle.write("\n" + table)
    return 1 if failed else 0


# ----------------------------------------------------------------------------- summary


def paper_comparison(results: list[dict]) -> str:
    lines = ["### Against the FLOPs-ideal and the paper\n",
             "| family | setting | measured speed-up | FLOPs-ideal | % of ideal | paper |", "|---|---|---|---|---|---|"]
    for result in results:
        for row in result["rows"][1:]:
            paper = f"{PAPER_SPEEDUP_32:.2f}x" if result["family"] == "LLaVA-1.5" and row["setting"] == "32" else "-"
            lines.append(f"| {result['family']} ({result['size']}) | {row['setting']} | {row['speedup']:.2f}x | "
                         f"{row['ideal_speedup']:.2f}x | {100 * row['speedup'] / row['ideal_speedup']:.0f}% | {paper} |")
    return "\n".join(lines) + "\n"


def summary_main(args) -> int:
    from tools import benchmark_prefill

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [json.loads(p.read_text()) for p in sorted(work.glob("prefill_*.json"))]
    if not results:
        print("[summary] no prefill results found", flush=True)
        return 1
    tables = [benchmark_prefill.markdown_report(r) for r in results]
    (out / "prefill.md").write_text(paper_comparison(results) + "\n" + "\n".join(tables))
    (out / "prefill.json").write_text(json.dumps(results, indent=2) + "\n")
    try:
        benchmark_prefill.plot_speedups(results, out / "prefill_speedup.png")
    except Exception as error:  # noqa: BLE001 - the plot is a convenience
        print(f"[summary] plot failed: {error}", flush=True)
    print(paper_comparison(results), flush=True)
    return 0


def docs_main(args) -> int:
    from mfpruner_lib.bench_utils import write_between_markers

    results = Path(args.results)
    written = 0
    for name in ("summary.md", "prefill.md", "cues.md"):
        if (results / name).exists():
            write_between_markers(args.docs, f"gpu {results.name} {name}", (results / name).read_text())
            written += 1
    print(f"[docs] {written} GPU tables from {results} written into {args.docs}", flush=True)
    return 0 if written else 1


@refusals_as_errors
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    device_map = commands.add_parser("device-map", help="vision tower on the CPU, LLM on the GPU: same results")
    device_map.add_argument("--out", required=True)
    device_map.add_argument("--size", default="cpu", choices=("smoke", "cpu"))
    device_map.add_argument("--device", default="cuda", help="the GPU ('cpu' only to dry-run the script)")
    device_map.add_argument("--family", action="append", choices=sorted(FAMILIES), help="repeatable; default: every family of mfpruner_lib.families")
    kernels = commands.add_parser("kernels", help="attention_with_received vs the exact map on the device")
    kernels.add_argument("--device", default="cuda")
    kernels.add_argument("--append", help="append the markdown table to this file")
    docs = commands.add_parser("docs", help="write committed GPU results into the docs page")
    docs.add_argument("--results", required=True, help="the folder the GPU check's files were committed to")
    docs.add_argument("--docs", default="docs/benchmarks.md")
    summary = commands.add_parser("summary", help="merge the prefill results, compare with the paper")
    summary.add_argument("--work", required=True)
    summary.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "device-map":
        args.family = args.family or list(FAMILIES)
        return device_map_main(args)
    if args.command == "docs":
        return docs_main(args)
    if args.command == "kernels":
        return kernels_main(args)
    return summary_main(args)


if __name__ == "__main__":
    sys.exit(main())
