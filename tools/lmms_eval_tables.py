"""Reproduces the paper's accuracy tables with lmms-eval, and turns the result JSONs into them.

    # run every setting of a table (one lmms-eval run per setting, data parallel over 8 GPUs)
    python -m tools.lmms_eval_tables run llava15 --pretrained PATH_OR_ID --output results/llava15 --num-processes 8
    # print the paper-style table: each score, and each score and the average as % of the unpruned run
    python -m tools.lmms_eval_tables summary llava15 results/llava15

`run --dry-run` prints the commands instead. Each setting writes under OUTPUT/<setting>; the
summary reads the newest `*_results.json` per task there. lmms-eval's CLI exits 0 even when an
evaluation failed (it logs the error), so `run` fails when a setting wrote no score for a task.
Needs lmms-eval and this project installed (`pip install -e ".[eval]"`); `summary` needs neither.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mfpruner_lib.cli import ArgumentParser, refusals_as_errors


@dataclass(frozen=True)
class Benchmark:
    name: str  # column header
    task: str  # lmms-eval task
    metric: str  # key in the task's results, without the ",none" filter suffix
    scale: float = 100.0  # fractions are shown as percentages; MME is a sum of scores


@dataclass(frozen=True)
class Setting:
    name: str  # folder under the output and the row label
    label: str
    model_args: str  # appended to pretrained=...


@dataclass(frozen=True)
class Table:
    title: str
    benchmarks: tuple[Benchmark, ...]
    settings: tuple[Setting, ...]  # the first one is the unpruned reference (100%)


# The paper's nine image benchmarks, as lmms-eval names them. POPE: F1 over its three splits;
# MME: perception score; VQAv2: the val split (test-dev scores come only from the submission server).
NINE_BENCHMARKS = (
    Benchmark("GQA", "gqa", "exact_match"),
    Benchmark("MMB", "mmbench_en_dev", "gpt_eval_score", scale=1.0),
    Benchmark("MMB-CN", "mmbench_cn_dev", "gpt_eval_score", scale=1.0),
    Benchmark("MME", "mme", "mme_perception_score", scale=1.0),
    Benchmark("POPE", "pope", "pope_f1_score"),
    Benchmark("SQA-IMG", "scienceqa_img", "exact_match"),
    Benchmark("VQAv2", "vqav2_val", "exact_match"),
    Benchmark("VizWiz", "vizwiz_vqa_val", "exact_match"),
    Benchmark("TextVQA", "textvqa_val", "exact_match"),
)

UNPRUNED = Setting("unpruned", "Unpruned", "prune_visual_tokens=False")

TABLES = {
    "llava15": Table(
        title="LLaVA-1.5 (576 visual tokens per image)",
        benchmarks=NINE_BENCHMARKS,
        settings=(UNPRUNED,)
        + tuple(Setting(f"budget-{k}", f"Keep {k}", f"visual_token_budget={k}") for k in (192, 128, 64, 32)),
    ),
    "qwen25vl": Table(
        title="Qwen2.5-VL (dynamic resolution: kept fraction of each image's tokens)",
        benchmarks=NINE_BENCHMARKS,
        settings=(UNPRUNED,)
        + tuple(
            Setting(f"prune-{pruned}", f"Prune {pruned}%", f"visual_token_ratio={keep}")
            for pruned, keep in (("55.5", 0.445), ("66.7", 0.333), ("77.8", 0.222))
        ),
    ),
}


def get_table(name: str) -> Table:
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; choose one of {sorted(TABLES)}")
    return TABLES[name]


# ----------------------------------------------------------------------------- run


def lmms_eval_command(
    table: Table,
    setting: Setting,
    pretrained: str,
    output: Path,
    num_processes: int = 1,
    batch_size: int = 1,
    extra_model_args: str = "",
    launcher_args: str = "",
    limit: int | None = None,
) -> list[str]:
    """One lmms-eval run: every benchmark of the table for one setting, through accelerate."""
    model_args = ",".join(arg for arg in (f"pretrained={pretrained}", setting.model_args, extra_model_args) if arg)
    command = ["accelerate", "launch", f"--num_processes={num_processes}", *shlex.split(launcher_args)]
    command += ["-m", "lmms_eval", "--model", "mfpruner", "--model_args", model_args]
    command += ["--tasks", ",".join(b.task for b in table.benchmarks), "--batch_size", str(batch_size)]
    command += ["--log_samples", "--output_path", str(output / setting.name)]
    if limit is not None:
        command += ["--limit", str(limit)]
    return command


def run(args) -> int:
    table = get_table(args.table)
    settings = table.settings
    if args.settings:
        wanted = args.settings.split(",")
        unknown = sorted(set(wanted) - {s.name for s in settings})
        if unknown:
            raise ValueError(f"unknown --settings {unknown}; the {args.table} table has {[s.name for s in settings]}")
        settings = tuple(s for s in settings if s.name in wanted)
    output = Path(args.output)
    for setting in settings:
        command = lmms_eval_command(
            table, setting, args.pretrained, output, args.num_processes, args.batch_size,
            args.model_args, args.launcher_args, args.limit,
        )
        print(shlex.join(command), flush=True)
        if args.dry_run:
            continue
        subprocess.run(command, check=True)
        scores = collect_scores(output / setting.name)
        missing = [b.task for b in table.benchmarks if metric_value(scores, b) is None]
        if missing:
            print(f"setting {setting.name}: lmms-eval wrote no score for {missing} (see its log above)", file=sys.stderr)
            return 1
    return 0


# ----------------------------------------------------------------------------- summary


def collect_scores(folder: Path) -> dict[str, dict]:
    """task -> its results dict, from the newest results JSON under `folder` that has the task."""
    scores: dict[str, dict] = {}
    for file in sorted(folder.rglob("*_results.json"), key=lambda f: f.name):  # names start with a timestamp
        for task, values in json.loads(file.read_text()).get("results", {}).items():
            scores[task] = values
    return scores


def metric_value(scores: dict[str, dict], benchmark: Benchmark) -> float | None:
    value = scores.get(benchmark.task, {}).get(f"{benchmark.metric},none")
    return None if value is None else float(value) * benchmark.scale


def summarize(table: Table, results: Path) -> str:
    """Markdown table: per setting each score with its % of the unpruned score, and the average %."""
    values = {s.name: {b.name: metric_value(collect_scores(results / s.name), b) for b in table.benchmarks} for s in table.settings}
    reference = values[table.settings[0].name]
    lines = [
        f"**{table.title}**",
        "",
        "| Setting | " + " | ".join(b.name for b in table.benchmarks) + " | Avg. |",
        "|---" * (len(table.benchmarks) + 2) + "|",
    ]
    for setting in table.settings:
        cells, ratios = [], []
        for benchmark in table.benchmarks:
            value, base = values[setting.name][benchmark.name], reference[benchmark.name]
            if value is None:
                cells.append("-")
            elif setting is table.settings[0] or not base:
                cells.append(f"{value:.1f}")
            else:
                ratios.append(100.0 * value / base)
                cells.append(f"{value:.1f} ({ratios[-1]:.1f}%)")
        complete = all(values[setting.name][b.name] is not None and reference[b.name] for b in table.benchmarks)
        if setting is table.settings[0]:
            average = "100.0%" if complete else "-"
        else:
            average = f"{sum(ratios) / len(ratios):.1f}%" if complete else "-"  # a partial average misleads
        lines.append(f"| {setting.label} | " + " | ".join(cells) + f" | {average} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


@refusals_as_errors
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run lmms-eval for every setting of a table")
    run_parser.add_argument("table", choices=sorted(TABLES))
    run_parser.add_argument("--pretrained", required=True, help="MFPruner repo (folder or hub id)")
    run_parser.add_argument("--output", required=True, help="results folder (one subfolder per setting)")
    run_parser.add_argument("--num-processes", type=int, default=1, help="GPUs (data parallel, one model per GPU)")
    run_parser.add_argument("--batch-size", type=int, default=1)
    run_parser.add_argument("--settings", default="", help="comma-separated subset of setting names")
    run_parser.add_argument("--model-args", default="", help="extra model_args, e.g. dtype=bfloat16")
    run_parser.add_argument("--launcher-args", default="", help="extra accelerate launch args (multi-node)")
    run_parser.add_argument("--limit", type=int, default=None, help="samples per task (smoke runs only)")
    run_parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    summary_parser = commands.add_parser("summary", help="print the paper-style table from result JSONs")
    summary_parser.add_argument("table", choices=sorted(TABLES))
    summary_parser.add_argument("results", help="the --output folder of `run`")
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.num_processes < 1 or args.batch_size < 1:
            raise ValueError("--num-processes and --batch-size must be positive ints")
        return run(args)
    print(summarize(get_table(args.table), Path(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
