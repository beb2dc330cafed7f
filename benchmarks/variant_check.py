"""How often a variant of the default changed the pruned model, and what its scoring step cost, from fresh_items.py's
results files: the figures NLL_REFINEMENT.md and REMOVAL_CANDIDATE.md quote besides the report's tables.

Per model and sparsity, over the runs both methods have (instance, calibration seed, global selection):
- runs whose pruned model answers every fresh and every original item as the default's does (the same keep map,
  as far as the items can tell);
- the median scoring seconds of the variant, of the default and of REAP (global), and the variant's and the
  default's medians over REAP's. The runs' timings come from whichever run made each cell: read the ratios to one
  significant figure where the cells were made by different runs (SEARCH_COST.md and ZOO_COST.md time in one
  process).

Usage (from benchmarks/):
    python variant_check.py --results results/other_instances/*.json results/nll_refinement/*.json \
        --variant validated-choice:refine_objective=nll
"""

from __future__ import annotations

import argparse
import statistics

from fresh_items import DEFAULT, MODELS, cell_key, load


def summary(data: dict, variant: str, default: str = DEFAULT, reference: str = "reap") -> list[dict]:
    """One row per model and sparsity the variant ran at (see the module docstring)."""
    keys = [k.split("|") for k in data["cells"]]
    rows = []
    for model in [m for m in MODELS if any(k[0] == m and k[3] == variant for k in keys)]:
        for sparsity in sorted({float(k[5]) for k in keys if k[0] == model and k[3] == variant}):
            runs = sorted({(int(k[1]), int(k[2])) for k in keys if k[0] == model and k[3] == variant
                           and float(k[5]) == sparsity
                           and cell_key(model, int(k[1]), int(k[2]), default, "global", sparsity) in data["cells"]})

            def cells(method: str, runs=runs, model=model, sparsity=sparsity) -> list[dict]:
                return [data["cells"][cell_key(model, z, s, method, "global", sparsity)] for z, s in runs]

            ours, theirs, ref = cells(variant), cells(default), cells(reference)
            seconds = {name: statistics.median(c["score_seconds"] for c in group)
                       for name, group in (("variant", ours), ("default", theirs), ("reference", ref))}
            rows.append({
                "model": model, "sparsity": sparsity, "runs": len(runs),
                "same_answers": sum(a["outcomes"] == b["outcomes"] and a["original"] == b["original"]
                                    for a, b in zip(ours, theirs)),
                **{f"{name}_seconds": value for name, value in seconds.items()},
                "variant_ratio": seconds["variant"] / seconds["reference"],
                "default_ratio": seconds["default"] / seconds["reference"],
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", nargs="+", required=True, help="fresh_items.py results files (one item sample)")
    parser.add_argument("--variant", required=True, help="the variant's label, as fresh_items.py's --default")
    parser.add_argument("--default", default=DEFAULT)
    args = parser.parse_args(argv)
    print(f"| model | sparsity | runs | same answers as {args.default} | median seconds: variant / default / reap "
          "| variant / reap | default / reap |")
    print("|---|---|---|---|---|---|---|")
    for r in summary(load(args.results), args.variant, args.default):
        print(f"| {r['model']} | {r['sparsity']:.0%} | {r['runs']} | {r['same_answers']} "
              f"| {r['variant_seconds']:.1f} / {r['default_seconds']:.1f} / {r['reference_seconds']:.2f} "
              f"| {r['variant_ratio']:.1f}x "
              f"| {r['default_ratio']:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
