"""Compares the JUnit results of tools/run_transformers_tests.sh: per family, the tests run, the
failures (failed or error) on the stock classes and on ours (pruning off), and the tests that fail
for ours only. Prints a Markdown table, then the ours-only tests by name.

    python tools/compare_transformers_tests.py RESULTS_FOLDER FAMILY...
"""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def outcomes(junit: Path) -> dict[str, str]:
    """test name -> "passed" / "failed" / "skipped" (an error counts as failed)."""
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            results[name] = "failed"
        elif case.find("skipped") is not None:
            results[name] = "skipped"
        else:
            results[name] = "passed"
    return results


def main(results: Path, families: list[str]) -> int:
    rows, ours_only_names = [], []
    for family in families:
        stock_file, ours_file = results / f"{family}-stock.xml", results / f"{family}-ours.xml"
        if not (stock_file.exists() and ours_file.exists()):
            rows.append(f"| {family} | not run | | | |")
            continue
        stock, ours = outcomes(stock_file), outcomes(ours_file)
        run = [name for name, outcome in stock.items() if outcome != "skipped"]
        failed_stock = {name for name, outcome in stock.items() if outcome == "failed"}
        failed_ours = {name for name, outcome in ours.items() if outcome == "failed"}
        # A test ours skips (or never reached) that the stock run passed is a difference too.
        missing = {name for name in run if name not in failed_stock and ours.get(name, "missing") in ("skipped", "missing")}
        ours_only = sorted((failed_ours - failed_stock) | missing)
        rows.append(f"| {family} | {len(run)} | {len(failed_stock)} | {len(failed_ours)} | {len(ours_only)} |")
        ours_only_names += [f"{family}: {name}" for name in ours_only]
    print("| family | tests run (stock) | failures stock | failures ours (pruning off) | ours only |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if ours_only_names:
        print("\nFailing for ours only:\n" + "\n".join(f"- {name}" for name in ours_only_names))
    return 1 if ours_only_names else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
