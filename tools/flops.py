"""The prefill FLOPs of the real models at the paper's budgets, as a markdown table
(mfpruner_lib.flops on the published configs of mfpruner_lib.model_sizes).

    python -m tools.flops [--text-tokens 60] [--output benchmarks/flops.md] [--docs docs/benchmarks.md]
"""

from __future__ import annotations

from mfpruner_core import resolve_budget
from mfpruner_lib import model_sizes
from mfpruner_lib.cli import ArgumentParser, refusals_as_errors
from mfpruner_lib.families import FAMILIES
from mfpruner_lib.flops import fastv_reduction, geometry, mlp_width, prefill_flops


TEXT_TOKENS = 60  # a LLaVA-1.5 prompt: system line + question + template


def real_models() -> list[tuple]:
    """(family, real model) pairs of the registry, in its order."""
    return [(family, model) for family in FAMILIES.values() for model in family.real_models]


def kept_tokens(all_tokens: int, budget: dict) -> int:
    return resolve_budget(all_tokens, budget.get("budget"), budget.get("ratio"))


def real_model_rows(models: list[tuple], text_tokens: int = TEXT_TOKENS) -> list[dict]:
    """One row per (model, budget), the unpruned prefill first. models: (family, real model) pairs."""
    rows = []
    for family, model in models:
        config = model.config()
        text = config.text_config
        n = geometry(config, model.image_hw).visual_tokens
        clip_text = model_sizes.clip_text_l() if model.clip_text else None
        full = prefill_flops(config, text_tokens, None, model.image_hw)
        rows.append(dict(model=model.name, note=model.note, setting="unpruned", kept=n, all=n, fastv=0.0,
                         flops=full, reduction=0.0, speedup=1.0))
        for label, budget in family.flops_budgets:
            k = kept_tokens(n, budget)
            pruned = prefill_flops(config, text_tokens, k, model.image_hw, clip_text_config=clip_text)
            rows.append(dict(
                model=model.name, note=model.note, setting=label, kept=k, all=n,
                fastv=fastv_reduction(n, k, text.hidden_size, mlp_width(text)),
                flops=pruned, reduction=1.0 - pruned.total / full.total, speedup=full.total / pruned.total,
            ))
    return rows


def markdown_table(rows: list[dict], text_tokens: int = TEXT_TOKENS) -> str:
    lines = [
        f"One image + {text_tokens} text tokens. FastV = the paper-comparable figure (FastV's formula over the "
        "visual tokens, LLM only). Whole prefill = vision tower + projector + CLIP text tower (LLaVA, the paper's "
        "relevance cue) + cues + LLM over all prompt tokens; TFLOPs = 2 x multiply-adds.",
        "",
        "| model | budget | visual tokens kept | FastV FLOPs reduction | whole prefill TFLOPs "
        "(vision / text tower / LLM) | whole-prefill reduction | ideal prefill speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["flops"]
        parts = f"{f.total / 1e12:.2f} ({(f.vision + f.projector) / 1e12:.2f} / {f.text_tower / 1e12:.3f} / {f.llm / 1e12:.2f})"
        fastv = "-" if r["setting"] == "unpruned" else f"{100 * r['fastv']:.1f}%"
        reduction = "-" if r["setting"] == "unpruned" else f"{100 * r['reduction']:.1f}%"
        model = f"{r['model']} ({r['note']})" if r["setting"] == "unpruned" else r["model"]
        lines.append(
            f"| {model} | {r['setting']} | {r['kept']} / {r['all']} | {fastv} | {parts} | {reduction} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


@refusals_as_errors
def main(argv=None):
    parser = ArgumentParser(description="FLOPs of the real models' prefill at the paper's budgets")
    parser.add_argument("--text-tokens", type=int, default=TEXT_TOKENS, help="prompt tokens besides the image")
    parser.add_argument("--output", help="also write the table to this markdown file")
    parser.add_argument("--docs", help="also write the table into this markdown page between "
                        "<!-- BEGIN flops --> / <!-- END flops --> (e.g. docs/benchmarks.md)")
    args = parser.parse_args(argv)
    if args.text_tokens < 0:
        raise ValueError(f"`--text-tokens` must be >= 0, got {args.text_tokens}")
    table = markdown_table(real_model_rows(real_models(), args.text_tokens), args.text_tokens)
    print(table)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write("# Prefill FLOPs of the real models (`python -m tools.flops`)\n\n" + table + "\n")
    if args.docs:
        from mfpruner_lib.bench_utils import write_between_markers

        write_between_markers(args.docs, "flops", table)


if __name__ == "__main__":
    main()
