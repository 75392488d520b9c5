"""Reproduction commands and the paper-style summary of lmms-eval result JSONs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.lmms_eval_tables import TABLES, Benchmark, Setting, Table, lmms_eval_command, main, summarize

from conftest import refused

TINY_TABLE = Table(
    title="Tiny",
    benchmarks=(Benchmark("GQA", "gqa", "exact_match"), Benchmark("MME", "mme", "mme_perception_score", scale=1.0)),
    settings=(
        Setting("unpruned", "Unpruned", "prune_visual_tokens=False"),
        Setting("budget-64", "Keep 64", "visual_token_budget=64"),
        Setting("budget-32", "Keep 32", "visual_token_budget=32"),
    ),
)


def write_result(folder: Path, name: str, results: dict):
    """A results file the way lmms-eval writes it: OUTPUT/<model>/<timestamp>_results.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"results": results, "config": {"model": "mfpruner"}}))


def test_summary_of_fixed_result_jsons(tmp_path):
    write_result(tmp_path / "unpruned" / "m", "20260101_000000_results.json", {
        "gqa": {"alias": "gqa", "exact_match,none": 0.62, "exact_match_stderr,none": 0.01},
        "mme": {"alias": "mme", "mme_perception_score,none": 1500.0, "mme_cognition_score,none": 300.0},
    })
    write_result(tmp_path / "budget-64" / "m", "20260101_000000_results.json", {
        "gqa": {"exact_match,none": 0.589},
        "mme": {"mme_perception_score,none": 1440.0},
    })
    # budget-32 ran GQA twice (the newer file wins) and has no MME yet: no average for that row
    write_result(tmp_path / "budget-32" / "m", "20260101_000000_results.json", {"gqa": {"exact_match,none": 0.10}})
    write_result(tmp_path / "budget-32" / "m", "20260102_000000_results.json", {"gqa": {"exact_match,none": 0.558}})

    assert summarize(TINY_TABLE, tmp_path) == "\n".join([
        "**Tiny**",
        "",
        "| Setting | GQA | MME | Avg. |",
        "|---|---|---|---|",
        "| Unpruned | 62.0 | 1500.0 | 100.0% |",
        "| Keep 64 | 58.9 (95.0%) | 1440.0 (96.0%) | 95.5% |",
        "| Keep 32 | 55.8 (90.0%) | - | - |",
    ])


def test_summary_cli_prints_the_table(tmp_path, capsys):
    write_result(tmp_path / "unpruned" / "m", "20260101_000000_results.json", {"gqa": {"exact_match,none": 0.5}})
    assert main(["summary", "llava15", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| Setting | GQA | MMB | MMB-CN | MME | POPE | SQA-IMG | VQAv2 | VizWiz | TextVQA | Avg. |"
    assert lines[4].startswith("| Unpruned | 50.0 | - |") and lines[4].endswith("| - |")
    assert [line.split(" |")[0] for line in lines[5:]] == ["| Keep 192", "| Keep 128", "| Keep 64", "| Keep 32"]


def test_paper_settings():
    llava = TABLES["llava15"]
    assert [s.model_args for s in llava.settings] == [
        "prune_visual_tokens=False",
        *(f"visual_token_budget={k}" for k in (192, 128, 64, 32)),
    ]
    qwen = TABLES["qwen25vl"]
    assert [s.model_args for s in qwen.settings[1:]] == [f"visual_token_ratio={r}" for r in (0.445, 0.333, 0.222)]
    assert len(llava.benchmarks) == len(qwen.benchmarks) == 9


def test_run_command_uses_accelerate_and_the_entry_point_model(tmp_path):
    table = TABLES["llava15"]
    command = lmms_eval_command(
        table, table.settings[3], "llava-hf/x", tmp_path, num_processes=8, batch_size=4,
        extra_model_args="dtype=bfloat16", launcher_args="--num_machines 2 --machine_rank 0", limit=10,
    )
    assert command[:5] == ["accelerate", "launch", "--num_processes=8", "--num_machines", "2"]
    assert command[command.index("-m") + 1] == "lmms_eval"
    assert command[command.index("--model") + 1] == "mfpruner"
    assert command[command.index("--model_args") + 1] == "pretrained=llava-hf/x,visual_token_budget=64,dtype=bfloat16"
    assert command[command.index("--tasks") + 1].split(",") == [b.task for b in table.benchmarks]
    assert command[command.index("--output_path") + 1] == str(tmp_path / "budget-64")
    assert command[command.index("--limit") + 1] == "10"


def test_run_dry_run_prints_one_command_per_setting(tmp_path, capsys):
    assert main(["run", "qwen25vl", "--pretrained", "p", "--output", str(tmp_path), "--dry-run"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 4 and all(c.startswith("accelerate launch --num_processes=1 -m lmms_eval") for c in commands)


def test_run_rejects_unknown_settings_and_tables(tmp_path, capsys):
    argv = ["run", "llava15", "--pretrained", "p", "--output", str(tmp_path), "--settings", "budget-7", "--dry-run"]
    assert refused(main, argv, capsys).startswith("unknown --settings ['budget-7']")
    assert "invalid choice: 'llava16'" in refused(main, ["summary", "llava16", str(tmp_path)], capsys)
