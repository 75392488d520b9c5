"""tools/gpu_check.py's steps, run on the CPU at smoke sizes (the same code the GPU run uses)."""

from __future__ import annotations

import json

import torch

from tools import benchmark_prefill, gpu_check


def test_split_device_map_puts_the_vision_side_on_the_cpu():
    for key, vision in (("llava-1.5", {"model.vision_tower", "model.multi_modal_projector"}),
                        ("llava-next", {"model.vision_tower", "model.multi_modal_projector", "model.image_newline"}),
                        ("qwen2.5-vl", {"model.visual"})):
        model = benchmark_prefill.FAMILIES[key].build("smoke", torch.float32, "meta")
        mapping = gpu_check.split_device_map(model, 0)
        assert {name for name, device in mapping.items() if device == "cpu"} == vision
        assert mapping["model.language_model"] == 0 and mapping["lm_head"] == 0


def test_device_map_check_compares_split_with_single_device_runs(tmp_path):
    # On the CPU both "devices" are the CPU: the run exercises loading, pruning and the comparisons.
    record = gpu_check.check_device_map("qwen2.5-vl", "smoke", "cpu", tmp_path)
    assert record["passed"], record
    assert set(record["checks"]) == {"split_vs_all_gpu", "split_vs_all_cpu"}
    assert record["kept"] and len(record["kept"][0]) < record["visual_tokens"]


def test_summary_compares_with_the_ideal_and_the_paper(tmp_path):
    rows = [dict(setting="unpruned", speedup=1.0, ideal_speedup=1.0),
            dict(setting="32", speedup=3.0, ideal_speedup=4.0)]
    text = gpu_check.paper_comparison([dict(family="LLaVA-1.5", size="real", rows=rows)])
    assert "| LLaVA-1.5 (real) | 32 | 3.00x | 4.00x | 75% | 3.42x |" in text
    assert gpu_check.main(["summary", "--work", str(tmp_path), "--out", str(tmp_path / "out")]) == 1  # nothing to merge


def test_docs_writes_the_committed_gpu_tables_between_markers(tmp_path):
    results = tmp_path / "gpu-NVIDIA-H200"
    results.mkdir()
    (results / "prefill.md").write_text("| prefill | table |\n")
    (results / "cues.md").write_text("| cue | table |\n")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nhand-written\n")
    assert gpu_check.main(["docs", "--results", str(results), "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written\n")
    assert "<!-- BEGIN gpu gpu-NVIDIA-H200 prefill.md -->" in text and "| cue | table |" in text
