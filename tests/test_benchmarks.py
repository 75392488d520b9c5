"""The benchmark scripts in smoke mode (tiny sizes, one round): well-formed outputs, right
pruned lengths, cues that agree with the straightforward ones. No timing assertions."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

import mfpruner_core as core
from mfpruner_core import resolve_budget
from mfpruner_lib import bench_utils
from tools import benchmark_cues, benchmark_prefill

from conftest import refused


@pytest.fixture(scope="module")
def prefill_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = benchmark_prefill.main(["--smoke", "--force", "--output-dir", str(out), "--plot", str(out / "speedup.png")])
    return results, out


def check_rows(result, expected_kept: list[int], newlines: int = 0):
    """Common checks of one family's smoke rows. expected_kept: the voted visual tokens per budget;
    newlines: LLaVA-NeXT's row separators, kept outside the budget."""
    n, text, rows = result["visual_tokens"], result["text_tokens"], result["rows"]
    assert [r["setting"] for r in rows][0] == "unpruned"
    lm_visual = [n] + [k + newlines for k in expected_kept]
    assert [r["kept"] for r in rows] == lm_visual
    # The LLM prefills the text and the kept visual tokens only.
    assert [r["lm_length"] for r in rows] == [text + k for k in lm_visual]
    for r in rows:
        for key in ("prefill_s", "lm_prefill_s", "speedup", "ideal_speedup", "lm_speedup", "decode_tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["peak_bytes"] > 0
    assert rows[0]["ideal_speedup"] == 1.0 and rows[0]["cue_overhead_s"] is None
    ideals = [r["ideal_speedup"] for r in rows]
    assert ideals == sorted(ideals) and ideals[-1] > 1.0  # fewer tokens, more ideal speed-up
    assert all(r["lm_ideal_speedup"] >= r["ideal_speedup"] for r in rows)  # the vision tower is not shortened
    assert all(math.isfinite(r["cue_overhead_pct"]) for r in rows[1:])


def by_key(results):
    return {r["key"]: r for r in results}


def test_prefill_smoke_runs_every_family(prefill_run):
    results, _ = prefill_run
    assert [r["key"] for r in results] == sorted(benchmark_prefill.FAMILIES)
    assert set(benchmark_prefill.FAMILIES) == {"llava-1.5", "llava-next", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe"}


def test_prefill_smoke_rows_llava_1_5(prefill_run):
    result = by_key(prefill_run[0])["llava-1.5"]
    n, text = result["visual_tokens"], result["text_tokens"]
    assert (n, text) == (36, 12)  # smoke LLaVA-1.5: 84 px / 14 = 6 x 6 tokens
    budgets = [b["visual_token_budget"] for _, b in benchmark_prefill.paper_budgets(n)]
    assert budgets == [12, 8, 4, 2]  # 192/128/64/32 of 576, scaled to 36
    check_rows(result, budgets)


def test_prefill_smoke_rows_llava_next(prefill_run):
    result = by_key(prefill_run[0])["llava-next"]
    # a 112x112 image on 56 px tiles (4 x 4 patches): base 16 + 2 x 2 grid of 8 x 8 + 8 newlines
    assert (result["visual_tokens"], result["text_tokens"]) == (16 + 64 + 8, 12)
    assert [r["setting"] for r in result["rows"]][1:] == ["22.2%", "11.1%", "5.6%"]
    # the ratio applies to the 80 patch tokens; the 8 newlines are always kept
    check_rows(result, [resolve_budget(80, ratio=r) for r in (0.222, 0.111, 0.056)], newlines=8)
    assert [r["kept"] for r in result["rows"]][1:] == [18 + 8, 9 + 8, 4 + 8]


@pytest.mark.parametrize("key, tokens, kept", [
    ("qwen2.5-vl", 16, [7, 5, 4]),  # a 112x112 image: 8 x 8 patches of 14 px, merged 2 x 2
    ("qwen3-vl", 64, [28, 21, 14]),  # a 256x256 image (Qwen3-VL's processor minimum): 16 x 16 patches of 16 px
    ("qwen3-vl-moe", 64, [28, 21, 14]),
    ("qwen3.5", 64, [28, 21, 14]),  # Qwen3-VL's tower and image without DeepStack, a hybrid LLM
    ("qwen3.5-moe", 64, [28, 21, 14]),
])
def test_prefill_smoke_rows_qwen(prefill_run, key, tokens, kept):
    result = by_key(prefill_run[0])[key]
    assert (result["visual_tokens"], result["text_tokens"]) == (tokens, 12)  # text counts the vision delimiters
    assert [r["setting"] for r in result["rows"]][1:] == ["44.4%", "33.3%", "22.2%"]
    check_rows(result, [resolve_budget(tokens, ratio=r) for r in (0.444, 0.333, 0.222)])
    assert [r["kept"] for r in result["rows"]][1:] == kept
    # cue A is timed where it is computed, paired per round, the same figure in every setting
    cue = result["cue_attention"]
    assert cue["patches"] == tokens * 4 and cue["stock_s"] > 0 and cue["capture_s"] > 0
    assert [r["capture_source"] for r in result["rows"]] == [None, "paired block", "paired block", "paired block"]
    assert {r["capture_overhead_s"] for r in result["rows"][1:]} == {cue["extra_spread_s"]["median"]}


def test_prefill_cue_attention_pair_times_the_same_attention_with_and_without_the_cue():
    from modeling_mfpruner_qwen2_5_vl import CueCapturingVisionAttention

    family = benchmark_prefill.FAMILIES["qwen2.5-vl"]
    model = family.build("smoke", torch.float32, "cpu")
    inputs = family.inputs(model, "smoke", 0, "cpu", family.text_tokens["smoke"])
    pair = family.cue_attention(model, inputs)
    assert pair["patches"] == int(inputs["image_grid_thw"].prod(-1).sum())
    with torch.inference_mode():
        stock, (captured, received) = pair["stock"](), pair["capture"]()
    # the stock call is the hooked module's own stock path; the capture call adds only the column sums
    hooked = [m for m in model.modules() if isinstance(m, CueCapturingVisionAttention)]
    assert len(hooked) == 1
    torch.testing.assert_close(captured, stock, atol=1e-5, rtol=1e-5)
    assert received.shape == (pair["patches"],) and torch.allclose(received.sum(), torch.tensor(float(pair["patches"])))
    for name in ("llava-1.5", "llava-next"):  # their capture is hooks on the tower: timed as the vision stage
        assert benchmark_prefill.FAMILIES[name].cue_attention is None


@pytest.mark.parametrize("key, unpruned_row", [
    ("llava-1.5", "| unpruned | 36 / 36 | 48 |"),
    ("llava-next", "| unpruned | 88 / 88 | 100 |"),
    ("qwen2.5-vl", "| unpruned | 16 / 16 | 28 |"),
    ("qwen3-vl", "| unpruned | 64 / 64 | 76 |"),
    ("qwen3-vl-moe", "| unpruned | 64 / 64 | 76 |"),
    ("qwen3.5", "| unpruned | 64 / 64 | 76 |"),
    ("qwen3.5-moe", "| unpruned | 64 / 64 | 76 |"),
])
def test_prefill_smoke_files(prefill_run, key, unpruned_row):
    results, out = prefill_run
    stem = f"prefill_{key}_smoke_cpu"
    table = (out / f"{stem}.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    budgets = len(by_key(results)[key]["rows"]) - 1
    assert len(lines) == 2 + 1 + budgets and all(line.count("|") == 14 for line in lines)
    assert "Machine:" in table and unpruned_row in table
    assert json.loads((out / f"{stem}.json").read_text())["rows"] == by_key(results)[key]["rows"]


def test_prefill_plot_includes_saved_results(prefill_run, tmp_path, monkeypatch):
    _, out = prefill_run
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --plot-also puts earlier runs' saved results in the same figure (one panel per result)
    saved = [str(out / "prefill_llava-1.5_smoke_cpu.json"), str(out / "prefill_qwen2.5-vl_smoke_cpu.json")]
    calls = []
    real_plot = benchmark_prefill.plot_speedups

    def recording_plot(results, path):
        calls.append([r["family"] for r in results])
        real_plot(results, path)

    monkeypatch.setattr(benchmark_prefill, "plot_speedups", recording_plot)
    benchmark_prefill.main(["--smoke", "--force", "--family", "llava-next", "--plot", str(tmp_path / "p.png"), "--plot-also", *saved])
    assert calls == [["LLaVA-1.5", "Qwen2.5-VL", "LLaVA-NeXT"]]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prefill_bad_arguments(capsys):
    assert "--repeats" in refused(benchmark_prefill.main, ["--repeats", "0"], capsys)
    assert "invalid int value: 'many'" in refused(benchmark_prefill.main, ["--repeats", "many"], capsys)


@pytest.fixture(scope="module")
def cue_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cues") / "cues.md"
    return benchmark_cues.main(["--smoke", "--force", "--section", "cues", "--output", str(out)]), out


def test_cue_smoke_rows(cue_run):
    rows, out = cue_run
    cases = benchmark_cues.SMOKE_CASES
    assert {(r["cue"], r["n"]) for r in rows} == {
        (cue, case.n) for cue in ("uniqueness", "[CLS] attention", "attention received") for case in cases
    }
    for r in rows:
        assert r["naive_run"] and r["ours_s"] > 0 and r["naive_s"] > 0
        assert r["max_abs_diff"] < 1e-4, r  # ours computes the same cue as the straightforward version
    table = out.read_text()
    assert sum(line.startswith("|") for line in table.splitlines()) == 2 + len(rows)


def test_cue_tables_name_the_queries_per_block_the_cue_used():
    # On CPU the chunked cue caps its blocks at CPU_QUERY_CHUNK; the tables say so, not the flag alone.
    cap = core.CPU_QUERY_CHUNK
    assert benchmark_cues.chunk_note(cap + 100, "cpu") == (
        f"query chunks of {cap:,} (`--query-chunk` {cap + 100:,}, capped at `CPU_QUERY_CHUNK` on CPU)"
    )
    assert benchmark_cues.chunk_note(cap - 1, "cpu") == f"query chunks of {cap - 1:,}"
    assert benchmark_cues.chunk_note(cap + 100, "cuda") == f"query chunks of {cap + 100:,}"


def test_cue_query_chunk_smaller_than_n(tmp_path, capsys):
    # 4 queries per step: 4 and 16 chunks at N = 16 and 64, still the materialised map's column sums
    rows = benchmark_cues.main(["--smoke", "--force", "--section", "cues", "--query-chunk", "4", "--output", str(tmp_path / "c.md")])
    received = [r for r in rows if r["cue"] == "attention received"]
    assert len(received) == len(benchmark_cues.SMOKE_CASES)
    assert all(r["naive_run"] and r["max_abs_diff"] < 1e-4 for r in received), received
    assert "query chunks of 4." in (tmp_path / "c.md").read_text()
    assert "--query-chunk" in refused(benchmark_cues.main, ["--smoke", "--force", "--section", "cues", "--query-chunk", "0"], capsys)


def test_cue_naive_skipped_above_memory_cap(tmp_path):
    rows = benchmark_cues.main(["--smoke", "--force", "--section", "cues", "--max-naive-gb", "1e-9", "--output", str(tmp_path / "c.md")])
    assert rows and not any(r["naive_run"] for r in rows)
    assert (tmp_path / "c.md").read_text().count("| not run |") == len(rows)


def test_straightforward_uniqueness_is_the_definition():
    import torch

    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    # cos: (1,2)=0, (1,3)=(2,3)=1/sqrt(2); self-pairs count 0, divided by N = 3.
    c = 2**-0.5
    expected = torch.tensor([[1 - c / 3, 1 - c / 3, 1 - 2 * c / 3]])
    assert torch.allclose(benchmark_cues.uniqueness_naive(x), expected)


def test_peak_memory_counts_a_temporary():
    import torch

    def make_and_drop():
        big = torch.ones(1024, 1024)  # 4 MiB, freed on return
        return float(big.sum())

    peak, result = bench_utils.peak_memory(make_and_drop)
    assert peak >= 4 * 2**20 and result == 1024 * 1024


def test_full_depth_attention_maps_size():
    llava = benchmark_cues.FULL_CASES[0]  # one 336 px tile: 577 tokens, 16 heads, 24 layers of float32 maps
    assert benchmark_cues.attention_maps_bytes(llava) == 24 * 1 * 16 * 577 * 577 * 4


# ----------------------------------------------------------------------------- honest numbers: load, spread, docs


def test_write_between_markers_replaces_only_its_section(tmp_path):
    page = tmp_path / "benchmarks.md"
    before = "# Benchmarks\n\nHand-written intro.\n\n"
    middle = "\nProse between the tables stays.\n\n"
    after = "\n\n## Notes\n\nHand-written notes.\n"
    page.write_text(
        before + "<!-- BEGIN prefill a cpu -->\nold a\n<!-- END prefill a cpu -->" + middle
        + "<!-- BEGIN prefill b cpu -->\nold b\n<!-- END prefill b cpu -->" + after
    )
    bench_utils.write_between_markers(page, "prefill a cpu", "| new | table |\n")
    text = page.read_text()
    assert text.startswith(before) and text.endswith("<!-- BEGIN prefill b cpu -->\nold b\n<!-- END prefill b cpu -->" + after)
    assert "old a" not in text and "| new | table |" in text and middle in text
    assert text.count("<!-- BEGIN prefill a cpu -->") == 1 and text.count("<!-- END prefill a cpu -->") == 1
    # rewriting the same section is idempotent; a new key is appended, the rest untouched
    bench_utils.write_between_markers(page, "prefill a cpu", "| new | table |\n")
    assert page.read_text() == text
    bench_utils.write_between_markers(page, "cues cuda", "gpu table")
    assert page.read_text().startswith(text) and page.read_text().rstrip().endswith("gpu table\n<!-- END cues cuda -->")


def test_write_between_markers_refuses_broken_markers(tmp_path):
    page = tmp_path / "b.md"
    page.write_text("<!-- BEGIN x -->\nno end\n")
    with pytest.raises(ValueError, match="broken"):
        bench_utils.write_between_markers(page, "x", "t")
    assert page.read_text() == "<!-- BEGIN x -->\nno end\n"
    with pytest.raises(ValueError, match="key"):
        bench_utils.write_between_markers(page, "a -- b", "t")


def test_spread_is_min_median_max():
    assert bench_utils.spread([3.0, 1.0, 2.0, 10.0]) == {"min": 1.0, "median": 2.5, "max": 10.0}
    assert bench_utils.ms_spread([0.001, 0.003, 0.002]) == "2.0 (1.0-3.0)"


def test_busy_reason_names_the_figure_and_the_threshold():
    quiet = bench_utils.MachineLoad(load_before=0.2, load_after=2.1, other_cores=0.05, cores=2)
    assert bench_utils.busy_reason(quiet, max_load=1.5) is None  # our own threads raise the load after: fine
    loaded = bench_utils.MachineLoad(load_before=3.2, load_after=4.0, other_cores=1.4, cores=2)
    reason = bench_utils.busy_reason(loaded, max_load=1.5, max_other_cores=0.25)
    assert "3.20 > threshold 1.50" in reason and "1.40 CPU cores" in reason and "threshold 0.25" in reason
    with pytest.raises(bench_utils.MachineBusy, match="--force"):
        bench_utils.check_quiet(loaded, force=False, max_load=1.5)
    forced = bench_utils.check_quiet(loaded, force=True, max_load=1.5)
    assert forced.forced and "FORCED" in bench_utils.describe_load(forced)
    assert not bench_utils.check_quiet(quiet, force=True, max_load=1.5).forced  # nothing to force


def test_busy_before_the_run_is_read_from_a_live_sample_not_the_decaying_load_average():
    # Right after an earlier benchmark the 1-minute load average is still high while the cores are idle.
    after_a_run = bench_utils.MachineLoad(load_before=2.4, other_cores_before=0.02, other_cores=0.01, cores=2)
    assert bench_utils.busy_reason(after_a_run, max_load=1.5) is None
    others_working = bench_utils.MachineLoad(load_before=0.3, other_cores_before=1.1, other_cores=0.01, cores=2)
    assert "1.10 CPU cores right before the run > threshold 0.25" in bench_utils.busy_reason(others_working, max_load=1.5)
    no_sample = bench_utils.MachineLoad(load_before=2.4, other_cores_before=None, other_cores=0.01, cores=2)
    assert "2.40 > threshold 1.50" in bench_utils.busy_reason(no_sample, max_load=1.5)


def test_other_cores_now_samples_other_processes_only():
    import subprocess
    import sys

    idle = bench_utils.other_cores_now(0.2)  # our own sleeping process is not counted
    if idle is None:
        pytest.skip("no /proc/stat")
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)
        busy = bench_utils.other_cores_now(1.0)
    finally:
        spinner.kill()
    assert busy >= 0.5  # one spinning process keeps about one core busy


def test_load_monitor_counts_other_processes_not_our_own_work():
    import os

    with bench_utils.LoadMonitor() as load:
        sum(i * i for i in range(200_000))  # our own CPU time is subtracted
    assert load.wall_s > 0 and load.load_after is not None and load.cores == (os.cpu_count() or 1)
    if load.other_cores is not None:
        assert load.other_cores >= 0.0


@pytest.fixture
def busy_machine(monkeypatch):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(bench_utils, "other_cores_now", lambda sample_s: 1.5)


def test_prefill_refuses_to_write_when_busy(busy_machine, tmp_path):
    docs = tmp_path / "docs.md"
    with pytest.raises(bench_utils.MachineBusy, match="1.50 CPU cores right before the run > threshold"):
        benchmark_prefill.main(["--smoke", "--family", "llava-1.5", "--output-dir", str(tmp_path / "out"),
                                "--docs", str(docs)])
    assert not (tmp_path / "out").exists() and not docs.exists()


def test_prefill_forced_run_is_marked_in_table_json_and_docs(busy_machine, tmp_path):
    docs = tmp_path / "docs.md"
    docs.write_text("intro\n")
    benchmark_prefill.main(["--smoke", "--force", "--family", "llava-1.5", "--output-dir", str(tmp_path), "--docs", str(docs)])
    record = json.loads((tmp_path / "prefill_llava-1.5_smoke_cpu.json").read_text())
    assert record["load"]["forced"] and record["load"]["load_before"] == 9.0
    assert "FORCED" in (tmp_path / "prefill_llava-1.5_smoke_cpu.md").read_text()
    text = docs.read_text()
    assert text.startswith("intro\n") and "<!-- BEGIN prefill llava-1.5 smoke cpu -->" in text and "FORCED" in text
    for row in record["rows"]:  # min / median / max per setting
        spread = row["prefill_spread_s"]
        assert spread["min"] <= spread["median"] <= spread["max"] and spread["median"] == row["prefill_s"]


def test_cues_refuse_to_write_when_busy(busy_machine, tmp_path):
    with pytest.raises(bench_utils.MachineBusy):
        benchmark_cues.main(["--smoke", "--section", "cues", "--output", str(tmp_path / "c.md")])
    assert not (tmp_path / "c.md").exists()


class RecordingModel:
    """Stands in for a model whose pruning calls record `last_pruning.timings` (the shared pipeline)."""

    def __init__(self, timings):
        self.timings, self.last_pruning = timings, None

    def __call__(self, prune_visual_tokens=True, **kwargs):
        if prune_visual_tokens:
            self.last_pruning = type("Result", (), {"timings": dict(self.timings)})()
        return "logits"


def test_stage_timings_come_from_the_pruning_call_itself():
    model = RecordingModel({"vision": 0.5, "cues": 0.01, "vote": 0.002, "splice": 0.003})
    recorded = []
    assert benchmark_prefill.prefill_recording_stages(model, {}, {}, recorded) == "logits"
    # an unpruned call leaves last_pruning alone: nothing new is recorded
    benchmark_prefill.prefill_recording_stages(model, {}, {"prune_visual_tokens": False}, recorded)
    model.timings = {"vision": 0.7, "cues": 0.03, "vote": 0.004, "splice": 0.005}
    benchmark_prefill.prefill_recording_stages(model, {}, {}, recorded)
    assert len(recorded) == 2
    medians = benchmark_prefill.stage_medians(recorded)
    assert medians == pytest.approx({"vision": 0.6, "cues": 0.02, "vote": 0.003, "splice": 0.004})
    assert benchmark_prefill.stage_medians([]) == {}


def test_prefill_overhead_source_is_named(prefill_run):
    results, _ = prefill_run
    for result in results:
        sources = {r["cue_overhead_source"] for r in result["rows"][1:]}
        # in-call timers where the model records them, else the paired-call difference (today's main)
        assert sources <= {"in-call timers", "difference of paired calls"} and len(sources) == 1
        has_timings = bool(result["rows"][1]["stage_s"])
        assert sources == {"in-call timers" if has_timings else "difference of paired calls"}


def test_attention_7b_section_smoke(tmp_path):
    rows = benchmark_cues.main(["--smoke", "--force", "--section", "attention-7b", "--output", str(tmp_path / "a.md"),
                                "--json", str(tmp_path / "a.json")])
    methods = {"stock attention", "two-pass", "one-pass (auto)", "one-pass chunked", "one-pass fused", "block forward"}
    assert {r["method"] for r in rows} == methods and not any("error" in r for r in rows)
    for r in rows:
        if r["method"].startswith("one-pass"):
            assert r["max_abs_diff_out"] < 1e-4 and r["max_rel_diff_received"] < 1e-4 and r["same_top_22_2pct"]
    table = (tmp_path / "a.md").read_text()
    assert "cue cost / block forward" in table and table.count("| smoke 8x8 (64) |") == len(methods)
    assert json.loads((tmp_path / "a.json").read_text())["load"]["forced"] in (True, False)


def test_lm_time_fit_recovers_a_fixed_cost_per_forward():
    fixed, per_row, per_pair = 0.08, 0.0014, 2e-7
    rows = [dict(lm_length=n, lm_prefill_s=fixed + per_row * n + per_pair * n * n) for n in (636, 252, 188, 124, 92)]
    got = benchmark_prefill.lm_time_fit(rows)
    assert got[0] == pytest.approx(fixed, rel=1e-6) and got[1] == pytest.approx(per_row, rel=1e-6)
    assert got[2] == pytest.approx(per_pair, rel=1e-4) and got[3] < 1e-9
    note = benchmark_prefill.lm_fit_note(dict(rows=[dict(r, decode_tokens_per_s=25.0) for r in rows], llm_weight_bytes=2**20))
    assert "fixed 80.0 ms per forward" in note and "1.0 MB of weights" in note and "40.0 ms" in note
    assert benchmark_prefill.lm_fit_note(dict(rows=rows[:3])) == ""  # 3 settings cannot fit 3 terms and a check


def test_llm_weight_bytes_counts_decoder_and_head_not_the_embedding_table():
    family = benchmark_prefill.FAMILIES["llava-1.5"]
    model = family.build("smoke", torch.float32, "cpu")
    decoder = model.model.language_model
    expected = 4 * (sum(p.numel() for p in decoder.parameters()) - decoder.embed_tokens.weight.numel()
                    + model.lm_head.weight.numel())
    assert benchmark_prefill.llm_weight_bytes(model) == expected


def test_process_tree_cpu_counts_a_server_and_its_children(tmp_path):
    """A benchmark's server is its own work: the CPU of the server's whole process tree (here a
    child that starts a spinning grandchild) is read before it stops, and the load monitor does
    not count it as other processes'."""
    import subprocess
    import sys

    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    # the grandchild counts while it runs, then in the child's waited-for children (the child stays)
    child = f"import subprocess, sys, time\nsubprocess.run([sys.executable, '-c', {spin!r}])\ntime.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 30
        while bench_utils.process_tree_cpu_seconds(parent.pid) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bench_utils.process_tree_cpu_seconds(parent.pid) >= 0.6
    finally:
        parent.kill()
        parent.wait()
    start = bench_utils.cpu_snapshot()
    assert bench_utils.other_cores_since(start, own_extra_s=1e9)[1] in (0.0, None)  # all busy time was ours


def test_vllm_serving_bad_arguments(capsys):
    from tools import benchmark_vllm

    assert "`--clients`" in refused(benchmark_vllm.main, ["--clients", "0"], capsys)
    assert "`--clients`" in refused(benchmark_vllm.main, ["--clients", "1,many"], capsys)
    assert "one count per client count" in refused(benchmark_vllm.main, ["--clients", "1,4", "--requests", "4"], capsys)
    assert "at least the clients" in refused(benchmark_vllm.main, ["--clients", "8", "--requests", "4"], capsys)
    assert "`--max-tokens`" in refused(benchmark_vllm.main, ["--max-tokens", "0"], capsys)
    assert "`--vllm-python`" in refused(benchmark_vllm.main, ["--vllm-python", "/no/such/python"], capsys)
    assert "--family" in refused(benchmark_vllm.main, ["--family", "llava-9"], capsys)
