"""Does an option of the default change what it keeps? The default and the default with the options, cell by cell.

An option meant to save time (a stopping rule, a cache) should keep the same experts. Where it does, every quality
table of the default holds for it on those models, with no new quality run. For each zoo model (zoo seed 0 from its
cache), calibration seed and sparsity (global selection) the run scores validated_choice with its defaults and
with the given options, one after the other on one thread, and writes which cells keep other experts, with the
two runs' seconds and REAP's, to a JSON file and a markdown table.

Usage (2-core CPU; ``python -m diep_hub.zoo.build`` makes the zoo models):
    cd benchmarks && python same_keep_maps.py --options min_move_gain_se=2 \
        --out results/same_keep_maps/min_move_gain_se2.json --report MOVE_FLOOR.md
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from quality import METHODS, score, select
from quality_seeds import parse_method
from report_notes import write_keeping_notes
from zoo_cost import add_cell_arguments, cells_meta, zoo_cells

from diep_hub.zoo.train import HELDOUT

logger = logging.getLogger("benchmarks.same_keep_maps")
HERE = Path(__file__).resolve().parent


def compare_cell(model, input_ids, variant, *, seed: int, sparsity: float, batch_size: int) -> dict:
    """One cell: REAP's, the default's and the variant's seconds, and whether the two keep the same experts."""
    row, keeps = {}, {}
    for label, (method, extra) in {"reap": (METHODS["reap"], {}), "default": (METHODS["validated-choice"], {}),
                                   "variant": variant}.items():
        result, seconds = score(model, method, input_ids, seed=seed, batch_size=batch_size, extra=extra,
                                sparsity=sparsity, selection="global")
        row[label] = round(seconds, 3)
        if label != "reap":
            keeps[label] = select(result.scores, model, sparsity=sparsity, mode="global")
            refinements = result.details["refinements"].values()
            row[f"{label}_moves"] = sum(len(r["moves"]) for r in refinements)
            # passes over the refine sequences the refinements spent, against refine_budget in those units
            row[f"{label}_refine_passes"] = sum(r.get("passes", 0.0) for r in refinements)
            row[f"{label}_refine_budget"] = result.details.get("refine_budget_passes")
    row["same_keep_map"] = keeps["default"] == keeps["variant"]
    return row


def render(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"# The default with `{meta['options']}` against the default: the same keep maps?",
        "",
        f"Command: `{meta['command']}` (whole run {meta['seconds']:.0f} s).",
        f"Machine: {meta['machine']}; one thread; each cell's runs in one process, one after the other.",
        f"Calibration: {meta['num_samples']} x {meta['seq_len']} tokens, seeds {meta['seeds']}, sparsities "
        f"{meta['sparsities']}, global selection; zoo seed 0 of each model. Seconds: medians over the cells; "
        "moves: refinement moves taken, summed over the cells; refinement passes: passes over the refine sequences, "
        "counted as refine_budget counts them (the most in a cell, and the budget in those units where one was set).",
        "",
        "| model | cells | same keep maps | REAP s | default s | with the options s | default / REAP | "
        "with the options / REAP | moves: default / with the options | most refinement passes: default / with the "
        "options |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def most_passes(rows, label):
        passes = [r[f"{label}_refine_passes"] for r in rows if f"{label}_refine_passes" in r]
        budgets = {r.get(f"{label}_refine_budget") for r in rows}
        if not passes:
            return "-"
        bound = ", budget " + "/".join(f"{b:g}" for b in sorted(budgets)) if None not in budgets else ""
        return f"{max(passes):.1f}{bound}"

    for model in meta["models"]:
        rows = [row for key, row in data["cells"].items() if key.split("|")[0] == model]
        if not rows:
            continue
        held = " (held-out)" if model in HELDOUT else ""
        ratio = [r["default"] / r["reap"] for r in rows]
        ratio_variant = [r["variant"] / r["reap"] for r in rows]
        lines.append(
            f"| {model}{held} | {len(rows)} | {sum(r['same_keep_map'] for r in rows)} of {len(rows)} | "
            f"{statistics.median(r['reap'] for r in rows):.2f} | {statistics.median(r['default'] for r in rows):.2f} "
            f"| {statistics.median(r['variant'] for r in rows):.2f} | {statistics.median(ratio):.1f}x | "
            f"{statistics.median(ratio_variant):.1f}x | {sum(r['default_moves'] for r in rows)} / "
            f"{sum(r['variant_moves'] for r in rows)} | {most_passes(rows, 'default')} / "
            f"{most_passes(rows, 'variant')} |")
    other = [key for key, row in data["cells"].items() if not row["same_keep_map"]]
    lines += ["", "Cells with other keep maps: " + (", ".join(other) if other else "none") + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", required=True, help="validated_choice options, KEY=VALUE[,KEY=VALUE...]")
    add_cell_arguments(parser)
    parser.add_argument("--out", required=True, help="results JSON (relative paths: under benchmarks/)")
    parser.add_argument("--report", default=None,
                        help="markdown file to write, keeping its hand notes (default: print)")
    parser.add_argument("--report-only", action="store_true", help="render --out without running")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out) if Path(args.out).is_absolute() else HERE / args.out
    if args.report_only:
        return report(json.loads(out.read_text(encoding="utf-8")), args.report)
    variant = (parse_method(f"validated-choice:{args.options}"), {})
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = {"cells": {}}
    for name, model, seed, sparsity, input_ids in zoo_cells(args):
        row = compare_cell(model, input_ids, variant, seed=seed, sparsity=sparsity, batch_size=args.batch_size)
        data["cells"][f"{name}|seed{seed}|{sparsity}"] = row
        logger.info("%s seed %d %.2f: %s", name, seed, sparsity, row)
    command = "python benchmarks/same_keep_maps.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data["meta"] = {**cells_meta(args, command, time.perf_counter() - started), "options": args.options}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return report(data, args.report)


def report(data: dict, path: str | None) -> int:
    text = render(data)
    if path:
        write_keeping_notes(path, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
