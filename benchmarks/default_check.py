"""Issue 12's bar, as a table: does the shipped default keep more than every baseline, model by model?

For each model and sparsity it compares the default method (global selection, the pruner's default; plain, and with
router recalibration) with the best baseline cell of the same variant over both selections, and says whether the
default is ahead by more than the seed spread (the larger of the two standard deviations), within it, or behind.
``--baseline-variant plain`` compares each variant of the default with the baselines as published instead.
Reads the JSON files of ``quality_seeds.py``.

With ``--instance`` (given once per instance of the zoo: the same model recipes trained again, with another seed or
on another machine) it pairs the runs instead: for each (instance, calibration seed) the default's retention minus a
baseline's, the mean of those differences and an exact sign-flip test of it. A baseline that keeps the same experts
whatever the seed has no spread, so "ahead by more than the spread" asks for a gain no method can show where both
sit at the unpruned accuracy; the paired test asks instead whether the default's advantage holds run by run, over
more runs than one instance has. With n pairs the smallest two-sided p-value is 2 / 2**n (3 pairs: 0.25, so one
instance alone can never show a difference). Every run is scored on the same 700 items, so this test holds the items
fixed; fresh_items.py scores the keep maps on a fresh, larger item sample and lets the items vary too.

Usage:
    python benchmarks/default_check.py --results benchmarks/results/choice/*.json
    python benchmarks/default_check.py --default validated-choice \
        validated-choice:refine_rounds=8,compare_uniform=false,refine_candidates=3,min_gain_se=2 --variants plain \
        --instance first benchmarks/results/choice/*.json --instance rebuild benchmarks/results/rebuild/*.json \
        --instance zoo-seed-1 benchmarks/results/zoo_seed1/*.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

from quality_seeds import split_key


def retention_by_seed(cells: dict, model: str, method: str, selection: str, sparsity: str,
                      variant: str) -> dict[str, float]:
    """{calibration seed: retention} of one cell (model, method, selection, sparsity, variant); empty if not run."""
    return {k[1]: v["retention"] for k, v in cells.items()
            if k[0] == model and k[2] == method and k[3] == selection and k[4] == sparsity and k[5] == variant}


def cell_stats(cells: dict, model: str, method: str, selection: str, sparsity: str, variant: str):
    """(mean, standard deviation, n) of retention over seeds, or None when the cell was not run."""
    values = list(retention_by_seed(cells, model, method, selection, sparsity, variant).values())
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


def table(data: dict, default: str, baselines: list[str], variants: list[str],
          baseline_variant: str | None = None) -> list[str]:
    """One row per model, sparsity and variant: the default (global) against the best baseline cell of the same
    variant, or of ``baseline_variant`` (e.g. the default recalibrated against the baselines as published, plain)."""
    cells = {split_key(k): v for k, v in data["cells"].items() if "retention" in v}
    models = [*data["meta"]["tuning"], *data["meta"]["heldout"]]
    lines = [f"| model | sparsity | variant | {default} (global) | best baseline (method, selection) | verdict |",
             "|---|---|---|---|---|---|"]
    for model in models:
        sparsities = sorted({k[4] for k in cells if k[0] == model}, key=float)
        for sparsity in sparsities:
            for variant in variants:
                mine = cell_stats(cells, model, default, "global", sparsity, variant)
                rivals = {(m, s): cell_stats(cells, model, m, s, sparsity, baseline_variant or variant)
                          for m in baselines for s in ("global", "uniform")}
                rivals = {k: v for k, v in rivals.items() if v is not None}
                if mine is None or not rivals:
                    continue
                (method, selection), best = max(rivals.items(), key=lambda kv: kv[1][0])
                against = f" (baselines {baseline_variant})" if baseline_variant not in (None, variant) else ""
                lines.append(
                    f"| {model} | {float(sparsity):.0%} | {variant}{against} | {mine[0]:.3f} +- {mine[1]:.3f} | "
                    f"{best[0]:.3f} +- {best[1]:.3f} ({method}, {selection}) | {verdict(mine, best)} |")
    return lines


def sign_flip_p_value(differences: list[float]) -> float:
    """Two-sided p-value of an exact paired sign-flip test: the share of the 2**n sign patterns whose mean
    difference is at least as far from zero as the observed one (1.0 when every difference is zero)."""
    n = len(differences)
    if n == 0 or n > 20:
        raise ValueError(f"the exact test enumerates 2**n patterns; got n={n}, allowed 1-20")
    observed = abs(sum(differences)) - 1e-12  # float noise must not split ties
    extreme = sum(abs(sum(s * d for s, d in zip(signs, differences))) >= observed
                  for signs in itertools.product((1, -1), repeat=n))
    return extreme / 2**n


def paired_runs(instances: dict[str, dict], model: str, defaults: list[str], method: str, selection: str,
                sparsity: str, variant: str) -> list[tuple[str, float, float]]:
    """(instance, default, baseline) retention for every (instance, calibration seed) that ran both; the default's
    row is the first of ``defaults`` an instance has (the same method may carry another label in older files)."""
    pairs = []
    for name, cells in instances.items():
        by_seed = {}
        for label in defaults:
            by_seed = retention_by_seed(cells, model, label, "global", sparsity, variant)
            if by_seed:
                break
        rival = retention_by_seed(cells, model, method, selection, sparsity, variant)
        pairs += [(name, by_seed[seed], rival[seed]) for seed in sorted(set(by_seed) & set(rival))]
    return pairs


def paired_verdict(differences: list[float], level: float = 0.05) -> tuple[float, str]:
    """(p-value, verdict) of the default's paired differences against one baseline."""
    p_value = sign_flip_p_value(differences)
    mean = statistics.fmean(differences)
    if p_value < level:
        return p_value, "ahead" if mean > 0 else "behind"
    return p_value, "no difference shown"


def paired_table(instances: dict[str, dict], defaults: list[str], baselines: list[str], variants: list[str],
                 level: float = 0.05) -> list[str]:
    """One row per model, sparsity and variant: the default against the best baseline (by mean over the pairs),
    and how many baselines (method x selection) it is significantly ahead of and behind.

    The calibration seeds of one instance share its weights, so its pairs are not independent and the test, which
    treats them as if they were, is surer than a test over instances alone would be; the row also gives on how many
    instances the mean difference is positive and negative."""
    models = list(dict.fromkeys(k[0] for cells in instances.values() for k in cells))
    lines = [f"Instances: {', '.join(instances)}. Pairs: (instance, calibration seed) runs of both methods. "
             f"Verdicts at two-sided p < {level} (exact sign-flip test of the paired differences).", "",
             "| model | sparsity | variant | pairs | default | best baseline (method, selection) | "
             "mean difference (min, max) | instances + / - | p | verdict | ahead of / behind of (baselines) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        sparsities = sorted({k[4] for cells in instances.values() for k in cells if k[0] == model}, key=float)
        for sparsity in sparsities:
            for variant in variants:
                compared = {}
                for method in baselines:
                    for selection in ("global", "uniform"):
                        pairs = paired_runs(instances, model, defaults, method, selection, sparsity, variant)
                        if pairs:
                            compared[(method, selection)] = pairs
                if not compared:
                    continue
                verdicts = {key: paired_verdict([a - b for _, a, b in pairs], level)
                            for key, pairs in compared.items()}
                (method, selection), pairs = max(compared.items(),
                                                 key=lambda kv: statistics.fmean(b for _, _, b in kv[1]))
                differences = [a - b for _, a, b in pairs]
                per_instance = [statistics.fmean(a - b for n, a, b in pairs if n == name)
                                for name in dict.fromkeys(n for n, _, _ in pairs)]
                signs = f"{sum(d > 0 for d in per_instance)} / {sum(d < 0 for d in per_instance)}"
                p_value, word = verdicts[(method, selection)]
                ahead = sum(v[1] == "ahead" for v in verdicts.values())
                behind = sum(v[1] == "behind" for v in verdicts.values())
                lines.append(
                    f"| {model} | {float(sparsity):.0%} | {variant} | {len(pairs)} | "
                    f"{statistics.fmean(a for _, a, _ in pairs):.3f} | {statistics.fmean(b for _, _, b in pairs):.3f} "
                    f"({method}, {selection}) | {statistics.fmean(differences):+.3f} ({min(differences):+.3f}, "
                    f"{max(differences):+.3f}) | {signs} | {p_value:.3f} | {word} | {ahead} / {behind} of "
                    f"{len(verdicts)} |")
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
    parser.add_argument("--results", nargs="+", help="quality_seeds.py JSON files (one instance of the zoo)")
    parser.add_argument("--instance", nargs="+", action="append", metavar=("NAME", "FILE"),
                        help="an instance of the zoo and its quality_seeds.py JSON files (repeat per instance): "
                             "pairs the runs over instances and seeds instead")
    parser.add_argument("--default", nargs="+", default=["validated-choice"],
                        help="the default's row label; with --instance, labels the same method had in older files")
    parser.add_argument("--level", type=float, default=0.05, help="with --instance: the test's two-sided level")
    parser.add_argument("--baselines", nargs="+", default=["reap", "frequency", "soft_frequency"])
    parser.add_argument("--variants", nargs="+", default=["plain", "recalibrated"])
    parser.add_argument("--baseline-variant", default=None,
                        help="compare every variant of the default with this variant of the baselines (e.g. plain: "
                             "the baselines as published); default: the same variant")
    parser.add_argument("--cost", action="store_true", help="print the scoring time against REAP's instead")
    args = parser.parse_args(argv)
    if args.instance:
        if args.baseline_variant:
            parser.error("--baseline-variant works with --results (the spread verdict), not with --instance")
        bad = [entry for entry in args.instance if len(entry) < 2]
        if bad or args.results:
            parser.error("--instance takes a name and at least one file each, and replaces --results")
        files = [Path(path).resolve() for _, *paths in args.instance for path in paths]
        if len(set(files)) != len(files):
            parser.error("a results file is given twice: its runs would be counted as two instances' pairs")
        instances = {}
        for name, *paths in args.instance:
            instances[name] = {split_key(k): v for path in paths
                               for k, v in json.loads(Path(path).read_text(encoding="utf-8"))["cells"].items()
                               if "retention" in v}
        print("\n".join(paired_table(instances, args.default, args.baselines, args.variants, args.level)))
        return 0
    if not args.results:
        parser.error("give --results or --instance")
    args.default = args.default[0]
    merged = {"meta": {"tuning": [], "heldout": []}, "cells": {}}
    for path in args.results:
        part = json.loads(Path(path).read_text(encoding="utf-8"))
        for key in ("tuning", "heldout"):
            merged["meta"][key] += [m for m in part["meta"].get(key, []) if m not in merged["meta"][key]]
        merged["cells"].update(part["cells"])
    lines = scoring_cost(merged, args.default) if args.cost else table(merged, args.default, args.baselines,
                                                                         args.variants, args.baseline_variant)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
