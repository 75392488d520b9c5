"""The benchmark scripts in smoke mode (tiny sizes, one round): well-formed outputs, right
pruned lengths, cues that agree with the straightforward ones. No timing assertions."""

from __future__ import annotations

import json
import math

import pytest

from mfpruner_core import resolve_budget
from tools import bench_utils, benchmark_cues, benchmark_prefill


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
    assert set(benchmark_prefill.FAMILIES) == {"llava-1.5", "llava-next", "qwen2.5-vl"}


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


def test_prefill_smoke_rows_qwen(prefill_run):
    result = by_key(prefill_run[0])["qwen2.5-vl"]
    # a 112x112 image: 8 x 8 patches of 14 px, merged 2 x 2 -> 16 tokens; text counts the vision delimiters
    assert (result["visual_tokens"], result["text_tokens"]) == (16, 12)
    assert [r["setting"] for r in result["rows"]][1:] == ["44.4%", "33.3%", "22.2%"]
    check_rows(result, [resolve_budget(16, ratio=r) for r in (0.444, 0.333, 0.222)])
    assert [r["kept"] for r in result["rows"]][1:] == [7, 5, 4]


@pytest.mark.parametrize("key, unpruned_row", [
    ("llava-1.5", "| unpruned | 36 / 36 | 48 |"),
    ("llava-next", "| unpruned | 88 / 88 | 100 |"),
    ("qwen2.5-vl", "| unpruned | 16 / 16 | 28 |"),
])
def test_prefill_smoke_files(prefill_run, key, unpruned_row):
    results, out = prefill_run
    stem = f"prefill_{key}_smoke_cpu"
    table = (out / f"{stem}.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    budgets = len(by_key(results)[key]["rows"]) - 1
    assert len(lines) == 2 + 1 + budgets and all(line.count("|") == 13 for line in lines)
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


def test_prefill_bad_arguments():
    with pytest.raises(ValueError, match="--repeats"):
        benchmark_prefill.main(["--repeats", "0"])


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


def test_cue_query_chunk_smaller_than_n(tmp_path):
    # 4 queries per step: 4 and 16 chunks at N = 16 and 64, still the materialised map's column sums
    rows = benchmark_cues.main(["--smoke", "--force", "--section", "cues", "--query-chunk", "4", "--output", str(tmp_path / "c.md")])
    received = [r for r in rows if r["cue"] == "attention received"]
    assert len(received) == len(benchmark_cues.SMOKE_CASES)
    assert all(r["naive_run"] and r["max_abs_diff"] < 1e-4 for r in received), received
    assert "query chunks of 4." in (tmp_path / "c.md").read_text()
    with pytest.raises(ValueError, match="--query-chunk"):
        benchmark_cues.main(["--smoke", "--force", "--section", "cues", "--query-chunk", "0"])


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
