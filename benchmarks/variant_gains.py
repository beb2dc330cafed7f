"""What merging and router recalibration add to each criterion, paired run by run, from quality_seeds.py's files.

For every model, sparsity and method it pairs each merged or recalibrated cell with the plain cell of the same
calibration seed and selection (the same keep map: the variant only changes what follows selection) and prints the
mean retention gain, its range and how many of the pairs gained, lost or stayed equal. The recalibration row also
counts the runs whose recalibration was undone (`applied: false`: the calibration KL did not go down, so the plain
model was kept), and a last table gives the calibration KL recalibration started from and what it left of it.
``--judge-by-text-loss`` asks whether a judge by text loss would pick each variant where it helps. The figures
VARIANTS_GRID.md quotes besides quality_seeds.py's tables.

Usage (from benchmarks/):
    python variant_gains.py --results results/variants_default/*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from quality_seeds import merge, split_key

VARIANTS = ("merged", "recalibrated")  # what is shown unless --variants says otherwise
CHOICES = (*VARIANTS, "recalibrated+scales")


Pairs = dict[tuple[str, str, str], list[tuple[dict, dict]]]  # (model, sparsity, method) -> [(baseline, variant)]


def paired_cells(data: dict, variant: str, baseline: str = "plain") -> Pairs:
    """{(model, sparsity, method): [(the baseline variant's cell, the variant's cell), ...]} over every (seed,
    selection) that ran both: the same keep map, so the pair differs only in what follows selection."""
    cells = {split_key(k): v for k, v in data["cells"].items() if "retention" in v}
    paired: dict[tuple[str, str, str], list[tuple[dict, dict]]] = {}
    for (model, seed, method, selection, sparsity, kind), cell in cells.items():
        other = cells.get((model, seed, method, selection, sparsity, baseline))
        if kind != variant or other is None:
            continue
        paired.setdefault((model, sparsity, method), []).append((other, cell))
    return paired


def gains(data: dict, variant: str, baseline: str = "plain") -> dict[tuple[str, str, str], list[tuple[float, dict]]]:
    """{(model, sparsity, method): [(variant retention - baseline variant's retention, the variant's cell), ...]}
    over every (seed, selection) that ran both."""
    return {key: [(cell["retention"] - other["retention"], cell) for other, cell in pairs]
            for key, pairs in paired_cells(data, variant, baseline).items()}


def table(data: dict, variant: str, baseline: str = "plain") -> list[str]:
    recalibrated = "recalibrated" in variant
    lines = [f"### {variant} minus {baseline} (pairs: calibration seeds x selections)", "",
             "| model | sparsity | method | pairs | mean gain | min, max | gained / lost / equal |"
             + (" recalibration undone |" if recalibrated else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if recalibrated else "")]
    models = [*data["meta"]["tuning"], *data["meta"]["heldout"]]
    paired = gains(data, variant, baseline)
    for model in models:
        for key in sorted((k for k in paired if k[0] == model), key=lambda k: (float(k[1]), k[2])):
            values = [g for g, _ in paired[key]]
            row = (f"| {model} | {float(key[1]):.0%} | {key[2]} | {len(values)} | {statistics.fmean(values):+.3f} | "
                   f"{min(values):+.3f}, {max(values):+.3f} | {sum(g > 0 for g in values)} / "
                   f"{sum(g < 0 for g in values)} / {sum(g == 0 for g in values)} |")
            if recalibrated:
                undone = sum(not c.get("recalibration", {}).get("applied", True) for _, c in paired[key])
                row += f" {undone} |"
            lines.append(row)
    lines.append("")
    overall = [(k, g) for k, pairs in paired.items() for g, _ in pairs]
    for model in models:
        for sparsity in sorted({k[1] for k, _ in overall if k[0] == model}, key=float):
            values = [g for k, g in overall if k[0] == model and k[1] == sparsity]
            lines.append(f"- {model} {float(sparsity):.0%}: mean {statistics.fmean(values):+.3f} over {len(values)} "
                         f"pairs, {sum(g > 0 for g in values)} gained, {sum(g < 0 for g in values)} lost")
    return lines


def recalibration_kl(data: dict, variant: str = "recalibrated") -> list[str]:
    """Per model and sparsity, over every recalibrated run (all methods and selections): the pruned model's
    calibration KL before recalibration (median), what recalibration left of it (median of after / before; 1 where
    it was undone), how many runs undid it, and its wall time beside REAP's scoring time on the same model (both
    from the same runs: read the ratio, not the seconds)."""
    cells = {split_key(k): v for k, v in data["cells"].items() if "recalibration" in v and split_key(k)[5] == variant}
    title = "Recalibration's" if variant == "recalibrated" else f"{variant}:"
    lines = [f"### {title} calibration KL (token-mean KL of the unpruned model's next-token distribution)", "",
             "| model | sparsity | runs | KL before (median) | after / before (median) | undone | seconds (median) | "
             "REAP's scoring seconds (median) |",
             "|---|---|---|---|---|---|---|---|"]
    reap_seconds: dict[str, list[float]] = {}  # REAP's plain runs, as default_check.py --cost reads them
    for key, cell in data["cells"].items():
        model, _, method, _, _, variant = split_key(key)
        if method == "reap" and variant == "plain" and "score_seconds" in cell:
            reap_seconds.setdefault(model, []).append(cell["score_seconds"])
    for model in [*data["meta"]["tuning"], *data["meta"]["heldout"]]:
        for sparsity in sorted({k[4] for k in cells if k[0] == model}, key=float):
            runs = [v["recalibration"] for k, v in cells.items() if k[0] == model and k[4] == sparsity]
            lines.append(
                f"| {model} | {float(sparsity):.0%} | {len(runs)} | "
                f"{statistics.median(r['kl_before'] for r in runs):.4f} | "
                f"{statistics.median(r['kl_after'] / r['kl_before'] for r in runs):.2f} | "
                f"{sum(not r['applied'] for r in runs)} | {statistics.median(r['seconds'] for r in runs):.1f} | "
                f"{statistics.median(reap_seconds[model]):.2f} |")
    return lines


def selection_by_kl(data: dict, variant: str, method: str = "validated-choice") -> list[str]:
    """Per model and sparsity: ``method``'s global run against picking, seed by seed, whichever of its global and
    uniform runs ``variant`` left with the lower calibration KL (a judge that needs no evaluation item; the KL is
    the one recalibration trained on, so it is in-sample)."""
    cells = {split_key(k): v for k, v in data["cells"].items() if "retention" in v}
    lines = [f"### {method}: global, or whichever selection {variant} left with the lower calibration KL", "",
             "| model | sparsity | runs | global | picked by the KL | picks (G = global, U = uniform) |",
             "|---|---|---|---|---|---|"]
    for model in [*data["meta"]["tuning"], *data["meta"]["heldout"]]:
        for sparsity in sorted({k[4] for k in cells if k[0] == model}, key=float):
            pairs = []
            for seed in sorted({k[1] for k in cells if k[0] == model}):
                both = [cells.get((model, seed, method, selection, sparsity, variant))
                        for selection in ("global", "uniform")]
                if None in both:
                    continue
                chosen = min(both, key=lambda c: c["recalibration"]["kl_after"])  # a tie keeps global
                pairs.append((both[0]["retention"], chosen["retention"], "G" if chosen is both[0] else "U"))
            if pairs:
                lines.append(f"| {model} | {float(sparsity):.0%} | {len(pairs)} | "
                             f"{statistics.fmean(p[0] for p in pairs):.4f} | "
                             f"{statistics.fmean(p[1] for p in pairs):.4f} | {''.join(p[2] for p in pairs)} |")
    return lines


def judged_by_text_loss(data: dict, variant: str, baseline: str = "plain") -> list[str]:
    """Per model and sparsity, over every method and selection: would a judge that keeps, run by run, whichever of
    the ``baseline`` and the ``variant`` model has the lower text loss pick the variant where it helps? The loss is
    each cell's own evaluation NLL on held-out zoo text (quality.py's ``num_loss`` lines, not the multiple-choice
    items): text of the evaluation's format, so an optimistic stand-in for a judge on calibration text."""
    paired = paired_cells(data, variant, baseline)
    title = f"### {baseline} or {variant}, whichever has the lower text loss (pairs: methods x seeds x selections)"
    lines = [title, "",
             f"| model | sparsity | pairs | {baseline} | {variant} | the lower text loss | pairs where it picks "
             f"{variant} | of those, retention gained / lost | text loss {variant} minus {baseline} (mean) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in [*data["meta"]["tuning"], *data["meta"]["heldout"]]:
        for sparsity in sorted({k[1] for k in paired if k[0] == model}, key=float):
            pairs = [(base, other) for key, both in paired.items() if key[:2] == (model, sparsity)
                     for base, other in both if "loss" in base and "loss" in other]
            if not pairs:
                continue
            picked = [(base, other) for base, other in pairs if other["loss"] < base["loss"]]
            judged = [(other if other["loss"] < base["loss"] else base)["retention"] for base, other in pairs]
            base_mean = statistics.fmean(p["retention"] for p, _ in pairs)
            lines.append(
                f"| {model} | {float(sparsity):.0%} | {len(pairs)} | {base_mean:.3f} | "
                f"{statistics.fmean(o['retention'] for _, o in pairs):.3f} | {statistics.fmean(judged):.3f} | "
                f"{len(picked)} | {sum(o['retention'] > p['retention'] for p, o in picked)} / "
                f"{sum(o['retention'] < p['retention'] for p, o in picked)} | "
                f"{statistics.fmean(o['loss'] - p['loss'] for p, o in pairs):+.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", nargs="+", required=True, help="quality_seeds.py JSON files")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=CHOICES)
    parser.add_argument("--baseline", default="plain", choices=("plain", "recalibrated"),
                        help="what each variant is paired with (the same keep map)")
    parser.add_argument("--judge-selection", action="store_true",
                        help="also: the default's global or uniform run, picked by recalibration's calibration KL")
    parser.add_argument("--judge-by-text-loss", action="store_true",
                        help="also: each variant or plain, whichever has the lower evaluation text loss, run by run")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only these methods' runs (default: every method in the files)")
    args = parser.parse_args(argv)
    data = merge([json.loads(Path(f).read_text(encoding="utf-8")) for f in args.results])
    if args.methods:
        data["cells"] = {k: v for k, v in data["cells"].items() if split_key(k)[2] in args.methods}
    for variant in args.variants:
        print("\n".join(table(data, variant, args.baseline)))
        print()
    kl_tables = ["\n".join(recalibration_kl(data, v)) for v in args.variants if "recalibrated" in v]
    if kl_tables:
        print("\n\n".join(kl_tables))
    for variant in (v for v in args.variants if "recalibrated" in v and args.judge_selection):
        print()
        print("\n".join(selection_by_kl(data, variant)))
    if args.judge_by_text_loss:
        for variant in args.variants:
            print()
            print("\n".join(judged_by_text_loss(data, variant, args.baseline)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
