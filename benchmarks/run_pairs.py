"""Run by run, one method of fresh_items.py's results against another: kept counts and items answered.

fresh_items.py's report gives each comparison's mean and interval; the notes that explain a verdict need the runs
behind it (which runs differ at all, by how many items). This prints them from the same results files, so those
figures can be re-read rather than taken on trust.

Usage (from benchmarks/):
    python run_pairs.py --results results/other_instances/mixtral-8e.json \
        results/validation_fraction/tuning-vf05.json --method validated-choice:validation_fraction=0.5 \
        --against validated-choice
"""

from __future__ import annotations

import argparse

from fresh_items import SELECTIONS, cell_key, load, unpack


def run_rows(data: dict, method: str, against: str, selection: str, against_selection: str) -> list[str]:
    """One row per run (model, zoo seed, calibration seed, sparsity) that has both cells, then per model and
    sparsity how many runs answer every fresh item alike."""
    meta = data["meta"]
    num_fresh = meta["num_mc"] * len(meta["domains"])
    lines = [f"| model | sparsity | zoo seed | calibration seed | kept: {method} | kept: {against} | "
             f"fresh items answered, {method} minus {against} | same answers |", "|---|---|---|---|---|---|---|---|"]
    totals: dict[tuple[str, float], list[bool]] = {}
    runs = sorted({(k[0], int(k[1]), int(k[2]), float(k[5])) for k in (key.split("|") for key in data["cells"])
                   if k[3] == method and k[4] == selection}, key=lambda r: (r[0], r[3], r[1], r[2]))
    for model, zoo_seed, seed, sparsity in runs:
        other = data["cells"].get(cell_key(model, zoo_seed, seed, against, against_selection, sparsity))
        if other is None:
            continue
        cell = data["cells"][cell_key(model, zoo_seed, seed, method, selection, sparsity)]
        answered = int(unpack(cell["outcomes"], num_fresh).sum()) - int(unpack(other["outcomes"], num_fresh).sum())
        same = cell["outcomes"] == other["outcomes"]
        totals.setdefault((model, sparsity), []).append(same)
        lines.append(f"| {model} | {sparsity:.0%} | {zoo_seed} | {seed} | {cell['kept']} | {other['kept']} | "
                     f"{answered:+d} | {'yes' if same else 'no'} |")
    lines.append("")
    lines += [f"- {model} {sparsity:.0%}: the same answers in {sum(same)} of {len(same)} runs"
              for (model, sparsity), same in totals.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", nargs="+", required=True, help="fresh_items.py results files (one item sample)")
    parser.add_argument("--method", required=True, help="a label of the files, e.g. validated-choice")
    parser.add_argument("--against", required=True, help="the label it is compared with")
    parser.add_argument("--selection", default="global", choices=SELECTIONS, help="--method's selection")
    parser.add_argument("--against-selection", default="global", choices=SELECTIONS, help="--against's selection")
    args = parser.parse_args(argv)
    data = load(args.results)
    labels = {key.split("|")[3] for key in data["cells"]}
    missing = [label for label in (args.method, args.against) if label not in labels]
    if missing:
        parser.error(f"no runs labelled {missing} in {args.results}; the files have {sorted(labels)}")
    print("\n".join(run_rows(data, args.method, args.against, args.selection, args.against_selection)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
