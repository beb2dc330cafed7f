"""Issue 12's bar, as a table: does the shipped default keep more than every baseline, model by model?

For each model and sparsity it compares the default method (global selection, the pruner's default; plain, and with
router recalibration) with the best baseline cell of the same variant over both selections, and says whether the
default is ahead by more than the seed spread (the larger of the two standard deviations), within it, or behind.
Reads the JSON files of ``quality_seeds.py``.

Usage:
    python benchmarks/default_check.py --results benchmarks/results/choice/*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from quality_seeds import split_key


def cell_stats(cells: dict, model: str, method: str, selection: str, sparsity: str, variant: str):
    """(mean, standard deviation, n) of retention over seeds, or None when the cell was not run."""
    values = [v["retention"] for k, v in cells.items()
              if k[0] == model and k[2] == method and k[3] == selection and k[4] == sparsity and k[5] == variant]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def verdict(default: tuple, best: tuple) -> str:
    margin = default[0] - best[0]
    spread = max(default[1], best[1])
    if margin > spread:
        return f"ahead by {margin:+.3f} (> spread {spread:.3f})"
    if margin < -spread:
        return f"behind by {margin:+.3f} (> spread {spread:.3f})"
    return f"within the spread ({margin:+.3f}, spread {spread:.3f})"


def table(data: dict, default: str, baselines: list[str], variants: list[str]) -> list[str]:
    cells = {split_key(k): v for k, v in data["cells"].items() if "retention" in v}
    models = [*data["meta"]["tuning"], *data["meta"]["heldout"]]
    lines = [f"| model | sparsity | variant | {default} (global) | best baseline (method, selection) | verdict |",
             "|---|---|---|---|---|---|"]
    for model in models:
        sparsities = sorted({k[4] for k in cells if k[0] == model}, key=float)
        for sparsity in sparsities:
            for variant in variants:
                mine = cell_stats(cells, model, default, "global", sparsity, variant)
                rivals = {(m, s): cell_stats(cells, model, m, s, sparsity, variant)
                          for m in baselines for s in ("global", "uniform")}
                rivals = {k: v for k, v in rivals.items() if v is not None}
                if mine is None or not rivals:
                    continue
                (method, selection), best = max(rivals.items(), key=lambda kv: kv[1][0])
                lines.append(
                    f"| {model} | {float(sparsity):.0%} | {variant} | {mine[0]:.3f} +- {mine[1]:.3f} | "
                    f"{best[0]:.3f} +- {best[1]:.3f} ({method}, {selection}) | {verdict(mine, best)} |")
    return lines


def scoring_cost(data: dict, default: str, reference: str = "reap") -> list[str]:
    """Median scoring seconds of the default and of ``reference`` per model (plain cells; same runs, same machine)."""
    cells = {split_key(k): v for k, v in data["cells"].items() if "score_seconds" in v}
    lines = [f"| model | {default} s | {reference} s | ratio |", "|---|---|---|---|"]
    for model in [*data["meta"]["tuning"], *data["meta"]["heldout"]]:
        mine = [v["score_seconds"] for k, v in cells.items() if k[0] == model and k[2] == default and k[5] == "plain"]
        ref = [v["score_seconds"] for k, v in cells.items() if k[0] == model and k[2] == reference and k[5] == "plain"]
        if mine and ref:
            a, b = statistics.median(mine), statistics.median(ref)
            lines.append(f"| {model} | {a:.2f} | {b:.2f} | {a / b:.1f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", nargs="+", required=True, help="quality_seeds.py JSON files")
    parser.add_argument("--default", default="validated-choice", help="the default's row label")
    parser.add_argument("--baselines", nargs="+", default=["reap", "frequency", "soft_frequency"])
    parser.add_argument("--variants", nargs="+", default=["plain", "recalibrated"])
    parser.add_argument("--cost", action="store_true", help="print the scoring time against REAP's instead")
    args = parser.parse_args(argv)
    merged = {"meta": {"tuning": [], "heldout": []}, "cells": {}}
    for path in args.results:
        part = json.loads(Path(path).read_text(encoding="utf-8"))
        for key in ("tuning", "heldout"):
            merged["meta"][key] += [m for m in part["meta"].get(key, []) if m not in merged["meta"][key]]
        merged["cells"].update(part["cells"])
    lines = scoring_cost(merged, args.default) if args.cost else table(merged, args.default, args.baselines,
                                                                         args.variants)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
