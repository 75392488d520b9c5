"""The benchmark scripts in smoke mode (tiny sizes, one round): well-formed outputs, right
pruned lengths, cues that agree with the straightforward ones. No timing assertions."""

from __future__ import annotations

import json
import math

import pytest

from tools import bench_utils, benchmark_cues, benchmark_prefill


@pytest.fixture(scope="module")
def prefill_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = benchmark_prefill.main(["--smoke", "--output-dir", str(out), "--plot", str(out / "speedup.png")])
    return results, out


def test_prefill_smoke_rows(prefill_run):
    results, _ = prefill_run
    assert [r["key"] for r in results] == sorted(benchmark_prefill.FAMILIES)
    result = results[0]
    n, text = result["visual_tokens"], result["text_tokens"]
    assert (n, text) == (36, 12)  # smoke LLaVA-1.5: 84 px / 14 = 6 x 6 tokens
    rows = result["rows"]
    assert [r["setting"] for r in rows][0] == "unpruned"
    budgets = [b["visual_token_budget"] for _, b in benchmark_prefill.paper_budgets(n)]
    assert budgets == [12, 8, 4, 2]  # 192/128/64/32 of 576, scaled to 36
    assert [r["kept"] for r in rows] == [n] + budgets
    # The LLM prefills the text and the kept visual tokens only.
    assert [r["lm_length"] for r in rows] == [text + k for k in [n] + budgets]
    for r in rows:
        for key in ("prefill_s", "lm_prefill_s", "speedup", "ideal_speedup", "lm_speedup", "decode_tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["peak_bytes"] > 0
    assert rows[0]["ideal_speedup"] == 1.0 and rows[0]["cue_overhead_s"] is None
    ideals = [r["ideal_speedup"] for r in rows]
    assert ideals == sorted(ideals) and ideals[-1] > 1.0  # fewer tokens, more ideal speed-up
    assert all(r["lm_ideal_speedup"] >= r["ideal_speedup"] for r in rows)  # the vision tower is not shortened
    assert all(math.isfinite(r["cue_overhead_pct"]) for r in rows[1:])


def test_prefill_smoke_files(prefill_run):
    results, out = prefill_run
    stem = "prefill_llava-1.5_smoke_cpu"
    table = (out / f"{stem}.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 5 and all(line.count("|") == 13 for line in lines)
    assert "Machine:" in table and "| unpruned | 36 / 36 | 48 |" in table
    assert json.loads((out / f"{stem}.json").read_text())["rows"] == results[0]["rows"]
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prefill_bad_arguments():
    with pytest.raises(ValueError, match="--repeats"):
        benchmark_prefill.main(["--repeats", "0"])


@pytest.fixture(scope="module")
def cue_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cues") / "cues.md"
    return benchmark_cues.main(["--smoke", "--output", str(out)]), out


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


def test_cue_naive_skipped_above_memory_cap(tmp_path):
    rows = benchmark_cues.main(["--smoke", "--max-naive-gb", "1e-9", "--output", str(tmp_path / "c.md")])
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
