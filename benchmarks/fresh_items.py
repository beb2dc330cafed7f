"""The default against every baseline on a fresh, larger sample of evaluation items, item by item.

quality_seeds.py scores every run on the same 700 items (100 per domain, item seed 1000), and default_check.py's
paired test treats those items as fixed: a difference of two or three items at 25% sparsity can be "significant" over
calibration seeds and still say nothing about the next sample of items. This script re-runs the default (global
selection) and the baselines (REAP, frequency, soft frequency; global and uniform; NAEE, uniform only, where its
exhaustive search is within its limit) on the cached zoo instances,
scores every keep map on a fresh item sample (another item seed, ``--num-mc`` items per domain) and stores every
item's outcome. The default's advantage over a baseline is then tested over both sources of chance: a crossed
bootstrap draws the runs (instance, calibration seed) and the items (within each domain) independently.

``--variant`` applies router recalibration (quality_seeds.py's variants) to every keep map of a run; its cells carry
the label ``METHOD+VARIANT``. ``--judge-selection`` adds, for the default, the keep map of whichever selection (global
or uniform) recalibration left with the lower calibration KL, labelled ``METHOD+VARIANT+judged`` (a judge that sees
no evaluation item; give that label as ``--default`` to report it).

Every keep map is also scored on the original 700 items, so each run can be checked against the stored run of
quality_seeds.py (``--stored``: the same keep map gives the same accuracy) and the two item samples compared run
by run.

Usage (2-core CPU; one process per model list, then the report over their files):
    python benchmarks/fresh_items.py --models mixtral-32e-top4-8l --out benchmarks/results/fresh_items/m32.json
    python benchmarks/fresh_items.py --report-only --results benchmarks/results/fresh_items/*.json \
        --stored benchmarks/results/rebuild/*.json ... --report benchmarks/FRESH_ITEMS.md
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import numpy as np
from default_check import sign_flip_p_value
from issue_bar import bar, bar_baselines
from item_intervals import crossed_bootstrap, interval
from quality import calibration_ids, score, select, uniform_counts
from quality_seeds import EVAL, parse_method, prune_variant, split_key
from report_notes import header, publish, with_this_command

from diep_hub import prune_experts
from diep_hub.criteria.base import get_criterion
from diep_hub.errors import DiEPError
from diep_hub.machine import machine_description
from diep_hub.recalibration import teacher_hidden_states
from diep_hub.zoo.tasks import ModelScorer, eval_items, multiple_choice_outcomes
from diep_hub.zoo.train import build_zoo_model

logger = logging.getLogger("benchmarks.fresh_items")
#: the zoo models the comparison runs on, in the order reports list them
MODELS = ("mixtral-8e", "olmoe-16e", "qwen2moe-8e-shared", "deepseek-v3-16e-groups", "mixtral-32e-top4-8l")
DEFAULT = "validated-choice"
BASELINES = ("reap", "frequency", "soft_frequency")
SELECTIONS = ("global", "uniform")
VARIANTS = ("plain", "recalibrated", "recalibrated+scales")


def variant_label(label: str, variant: str, judged: bool = False) -> str:
    """The label a run's cells carry: the method's, plus ``+VARIANT`` unless plain, plus ``+judged``."""
    return label + ("" if variant == "plain" else f"+{variant}") + ("+judged" if judged else "")


def pack(outcomes: list[bool]) -> str:
    """Item outcomes as a hex string, one bit an item (first item = highest bit)."""
    bits = "".join("1" if o else "0" for o in outcomes)
    return format(int(bits, 2), f"0{(len(bits) + 3) // 4}x")


def unpack(packed: str, num: int) -> np.ndarray:
    """The inverse of :func:`pack`: ``num`` outcomes as a 0/1 float array."""
    bits = format(int(packed, 16), f"0{len(packed) * 4}b")[-num:]
    return np.frombuffer(bits.encode(), dtype=np.uint8).astype(np.float64) - ord("0")


def item_outcomes(model, tokenizer, items: dict) -> list[bool]:
    """Every item's outcome, domains in ``items`` order."""
    per_domain = multiple_choice_outcomes(ModelScorer(model, tokenizer), items)
    return [o for d in items for o in per_domain[d]]


def cell_key(model: str, zoo_seed: int, seed: int, method: str, selection: str, sparsity: float) -> str:
    return f"{model}|{zoo_seed}|{seed}|{method}|{selection}|{sparsity}"


def run(args) -> None:
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"meta": {}, "base": {}, "cells": {}}
    fresh = eval_items(args.num_mc, seed=args.item_seed)
    original = eval_items(EVAL["num_mc"], seed=EVAL["seed"])
    meta = {"machine": machine_description(), "num_mc": args.num_mc, "item_seed": args.item_seed,
            "domains": list(fresh), "original_items": {"num_mc": EVAL["num_mc"], "seed": EVAL["seed"]},
            "num_samples": args.num_samples, "seq_len": args.seq_len}
    if data["meta"] and any(data["meta"].get(k) != meta[k] for k in ("num_mc", "item_seed", "domains")):
        raise SystemExit(f"{out} was made with other items ({data['meta'].get('num_mc')} per domain, item seed "
                         f"{data['meta'].get('item_seed')}); use another --out")
    data["meta"] = with_this_command(data["meta"], meta)
    for name in args.models:
        for zoo_seed in args.zoo_seeds:
            model, tokenizer = build_zoo_model(name, seed=zoo_seed)
            base_key = f"{name}|{zoo_seed}"
            if base_key not in data["base"]:
                data["base"][base_key] = {"outcomes": pack(item_outcomes(model, tokenizer, fresh)),
                                          "original": pack(item_outcomes(model, tokenizer, original))}
            for seed in args.seeds:
                input_ids = calibration_ids(tokenizer, args.num_samples, args.seq_len, seed)
                teacher = None if args.variant == "plain" else teacher_hidden_states(model, input_ids,
                                                                                     batch_size=args.batch_size)
                for method in dict.fromkeys([args.default, *args.baselines]):
                    _run_method(model, tokenizer, name, zoo_seed, seed, method, input_ids, fresh, original, data,
                                args, teacher)
                    out.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _run_method(model, tokenizer, name, zoo_seed, seed, label, input_ids, fresh, original, data, args,
                teacher=None) -> None:
    method = parse_method(label)
    criterion = get_criterion(method.criterion)
    is_default = label == args.default
    judged = is_default and args.judge_selection
    # the judge needs the default's uniform keep map too; it is pruned and recalibrated but not stored
    selections = SELECTIONS if judged or not is_default else ("global",)
    selections = tuple(s for s in selections if s in criterion.selections)  # naee: uniform only
    stored = variant_label(label, args.variant)
    shared = None
    for sparsity in args.sparsities:
        keys = {s: cell_key(name, zoo_seed, seed, stored, s, sparsity) for s in selections}
        judged_key = cell_key(name, zoo_seed, seed, variant_label(label, args.variant, True), "global", sparsity)
        wanted = [s for s in selections if keys[s] not in data["cells"] and (s == "global" or not is_default)]
        if not wanted and (not judged or judged_key in data["cells"]):
            continue
        pruned_by_selection = {}
        for selection in selections:
            if criterion.needs_target_counts or criterion.needs_sparsity:
                counts = uniform_counts(model, sparsity) if selection == "uniform" else None
                try:
                    result, secs = score(model, method, input_ids, seed=seed, batch_size=args.batch_size,
                                         num_to_keep=counts, sparsity=sparsity, selection=selection)
                except DiEPError as exc:  # refused before any work (e.g. NAEE's subset count): say so, go on
                    data.setdefault("skipped", {})[keys[selection]] = str(exc)
                    logger.warning("%s: %s", keys[selection], exc)
                    continue
            else:
                shared = shared or score(model, method, input_ids, seed=seed, batch_size=args.batch_size)
                result, secs = shared
            keep = select(result.scores, model, sparsity=sparsity, mode=selection)
            if args.variant == "plain":
                pruned, info = prune_experts(copy.deepcopy(model), keep), {}
            else:
                pruned, info = prune_variant(model, keep, args.variant, input_ids, teacher, args)
            cell = {"kept": [len(keep[k]) for k in sorted(keep)], "score_seconds": round(secs, 2), **info}
            pruned_by_selection[selection] = (pruned, cell)
            if selection in wanted:
                data["cells"][keys[selection]] = _scored(cell, pruned, tokenizer, fresh, original)
                logger.info("%s kept %s (%.1fs)", keys[selection], cell["kept"], secs)
        if judged and judged_key not in data["cells"]:
            kls = {s: cell["recalibration"]["kl_after"] for s, (_, cell) in pruned_by_selection.items()}
            picked = min(SELECTIONS, key=lambda s: kls[s])  # a tie keeps global
            pruned, cell = pruned_by_selection[picked]
            scored = data["cells"].get(keys[picked]) if picked in wanted else None  # scored a moment ago
            data["cells"][judged_key] = {**(scored or _scored(cell, pruned, tokenizer, fresh, original)),
                                         "picked": picked, "kl_after": kls}
            logger.info("%s picked %s (calibration KL %s)", judged_key, picked, kls)


def _scored(cell: dict, pruned, tokenizer, fresh: dict, original: dict) -> dict:
    """``cell`` plus the pruned model's outcomes on the fresh and the original items."""
    return {**cell, "outcomes": pack(item_outcomes(pruned, tokenizer, fresh)),
            "original": pack(item_outcomes(pruned, tokenizer, original))}


# ----------------------------------------------------------------------------------------------- analysis


def load(paths: list[str]) -> dict:
    """The cells and unpruned outcomes of several results files (one item sample)."""
    merged = {"meta": None, "base": {}, "cells": {}, "skipped": {}}
    for path in paths:
        part = json.loads(Path(path).read_text())
        if merged["meta"] and any(merged["meta"][k] != part["meta"][k] for k in ("num_mc", "item_seed", "domains")):
            raise SystemExit(f"{path} holds another item sample than the files before it")
        merged["meta"] = merged["meta"] or part["meta"]
        merged["meta"].setdefault("all_commands", []).extend(part["meta"]["commands"])
        merged["base"].update(part["base"])
        merged["cells"].update(part["cells"])
        merged["skipped"].update(part.get("skipped", {}))
    return merged


def stored_check(data: dict, stored_paths: list[str], num_original: int) -> tuple[int, int, list[str]]:
    """(equal, compared, mismatches): runs whose kept counts and original-item accuracy equal the stored
    quality_seeds.py run. A run stored in several files is taken from the last one (a re-run replaces an older
    one: list the files oldest first)."""
    stored: dict[tuple[int, str], dict] = {}
    for path in stored_paths:
        part = json.loads(Path(path).read_text())
        zoo_seed = part["meta"].get("zoo_seed", 0)
        stored.update({(zoo_seed, key): cell for key, cell in part["cells"].items()})
    equal = compared = 0
    mismatches = []
    for (zoo_seed, key), cell in stored.items():
        model, seed, method, selection, sparsity, variant = split_key(key)
        ours = data["cells"].get(cell_key(model, zoo_seed, int(seed), method, selection, float(sparsity)))
        if variant != "plain" or "mc" not in cell or ours is None:
            continue
        compared += 1
        mc = float(unpack(ours["original"], num_original).mean())
        if abs(mc - cell["mc"]) < 1e-9 and ours["kept"] == cell["kept"]:
            equal += 1
        else:
            mismatches.append(f"{key} (zoo seed {zoo_seed}): {mc:.4f} {ours['kept']} against stored "
                              f"{cell['mc']:.4f} {cell['kept']}")
    return equal, compared, mismatches


def comparisons(data: dict, *, draws: int, default: str = DEFAULT, baselines: tuple[str, ...] = BASELINES,
                level: float = 0.05) -> list[dict]:
    """The default (global) against each baseline (each selection it ran with), per model and sparsity."""
    rows = []
    keys = [k.split("|") for k in data["cells"]]
    for model in sorted({k[0] for k in keys}, key=lambda m: (MODELS.index(m) if m in MODELS else len(MODELS), m)):
        for sparsity in sorted({float(k[5]) for k in keys if k[0] == model}):
            runs = sorted({(int(k[1]), int(k[2])) for k in keys
                           if k[0] == model and k[3] == default and float(k[5]) == sparsity})
            for method in baselines:
                for selection in SELECTIONS:
                    pairs = [(z, s) for z, s in runs
                             if cell_key(model, z, s, method, selection, sparsity) in data["cells"]]
                    if pairs:
                        rows.append(compare(data, model, sparsity, method, selection, pairs, draws, level,
                                            default))
    return rows


def compare(data: dict, model: str, sparsity: float, method: str, selection: str, pairs: list[tuple[int, int]],
            draws: int, level: float, default: str = DEFAULT) -> dict:
    """One row: the default (global) minus one baseline over the runs ``pairs`` (zoo seed, calibration seed)."""
    meta = data["meta"]
    num_fresh = meta["num_mc"] * len(meta["domains"])
    num_original = meta["original_items"]["num_mc"] * len(meta["domains"])

    def outcomes(zoo_seed: int, seed: int, label: str, mode: str, sample: str, num: int) -> np.ndarray:
        return unpack(data["cells"][cell_key(model, zoo_seed, seed, label, mode, sparsity)][sample], num)

    def base(zoo_seed: int, sample: str, num: int) -> np.ndarray:
        return unpack(data["base"][f"{model}|{zoo_seed}"][sample], num)

    fresh_base = np.stack([base(z, "outcomes", num_fresh) for z, _ in pairs])
    fresh_baseline = np.stack([outcomes(z, s, method, selection, "outcomes", num_fresh) for z, s in pairs])
    domain_of_item = np.repeat(np.arange(len(meta["domains"])), meta["num_mc"])

    def against_baseline(fresh: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Per-run retention differences of ``fresh`` [runs, items] minus the baseline, and their interval."""
        differences = fresh - fresh_baseline
        boot = crossed_bootstrap(differences, fresh_base, domain_of_item, draws=draws)
        per_run = differences.mean(axis=1) / fresh_base.mean(axis=1)
        return (per_run, *interval(float(per_run.mean()), boot, len(pairs), level))

    fresh_default = np.stack([outcomes(z, s, default, "global", "outcomes", num_fresh) for z, s in pairs])
    fresh_runs, low, high = against_baseline(fresh_default)
    # A pruning that kept every answer of the unpruned model: if even it is not shown ahead of this baseline,
    # no criterion can be (short of pruning that corrects the unpruned model), and the bar cannot be met here.
    faithful_runs, faithful_low, _ = against_baseline(fresh_base)
    original = [(outcomes(z, s, default, "global", "original", num_original).mean()
                 - outcomes(z, s, method, selection, "original", num_original).mean())
                / base(z, "original", num_original).mean() for z, s in pairs]
    by_instance = {z: float(np.mean([d for (zz, _), d in zip(pairs, fresh_runs, strict=True) if zz == z]))
                   for z in dict.fromkeys(z for z, _ in pairs)}
    default_runs = fresh_default.mean(axis=1) / fresh_base.mean(axis=1)  # retention of each run
    baseline_runs = fresh_baseline.mean(axis=1) / fresh_base.mean(axis=1)
    return {
        "model": model, "sparsity": sparsity, "method": method, "selection": selection,
        "fresh_default": float(default_runs.mean()), "fresh_baseline": float(default_runs.mean() - fresh_runs.mean()),
        "pairs": len(pairs), "instances_up": sum(d > 0 for d in by_instance.values()),
        "instances_down": sum(d < 0 for d in by_instance.values()),
        "original_mean": float(np.mean(original)), "original_p": sign_flip_p_value(original),
        "fresh_mean": float(fresh_runs.mean()), "fresh_p_runs": sign_flip_p_value(list(fresh_runs)),
        "low": float(low), "high": float(high),
        "faithful_mean": float(faithful_runs.mean()), "faithful_low": float(faithful_low),
        # the highest retention of one run, the default's or this baseline's: above 1, pruning corrected the model
        "highest_run_retention": float(max(default_runs.max(), baseline_runs.max())),
        "verdict": "ahead" if low > 0 else "behind" if high < 0 else "no difference shown",
    }


TITLE = "The default against every baseline on fresh evaluation items"


def report(data: dict, rows: list[dict], stored: tuple[int, int, list[str]] | None, draws: int,
           default: str = DEFAULT, title: str = TITLE) -> list[str]:
    meta = data["meta"]
    lines = header(title, meta["all_commands"], meta["machine"]) + [
        f"Runs: the cached zoo instances (zoo seeds) x calibration seeds ({meta['num_samples']} x {meta['seq_len']} "
        f"tokens, as quality_seeds.py); the default ({default}, global) and each baseline on the same run.  ",
        f"Items: fresh = {meta['num_mc']} 4-way items per domain x {len(meta['domains'])} domains (item seed "
        f"{meta['item_seed']}); original = the {meta['original_items']['num_mc']} per domain (item seed "
        f"{meta['original_items']['seed']}) that quality_seeds.py scores. Retention = pruned / unpruned accuracy "
        "of the same instance on the same items.",
        "",
        f"Columns: mean difference of retention (default minus baseline) over the runs; p = exact sign-flip test "
        f"over the runs, items held fixed (default_check.py's test); instances + / - = how many instances' mean "
        f"difference is above / below 0 (runs of one instance share its weights); 95% interval = the mean +- "
        f"Student's t (runs - 1 degrees of freedom) times the error of a crossed bootstrap ({draws} draws) over "
        "runs and items (items within each domain), corrected for few runs (`interval`); the verdict's test: ahead "
        "or behind when the interval excludes 0.",
        "",
    ]
    if stored is not None:
        equal, compared, mismatches = stored
        lines += [f"Check against the stored quality_seeds.py runs: {equal} of {compared} runs give the same kept "
                  "counts and the same accuracy on the original items.", ""]
        lines += [f"- differs: {m}" for m in mismatches[:10]] + ([""] if mismatches else [])
    lines += [
        "| model | sparsity | baseline | pairs | original items: difference (p) | fresh items: difference (p) "
        "| instances + / - | 95% interval (runs x items) | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sparsity']:.0%} | {r['method']}, {r['selection']} | {r['pairs']} "
            f"| {r['original_mean']:+.4f} ({r['original_p']:.3f}) | {r['fresh_mean']:+.4f} ({r['fresh_p_runs']:.3f}) "
            f"| {r['instances_up']} / {r['instances_down']} | [{r['low']:+.4f}, {r['high']:+.4f}] | {r['verdict']} |")
    lines += not_run(data)
    lines += ["", "## Per model and sparsity", "",
              "Retention on the fresh items, mean over the runs: the default's and the best baseline's. The column "
              "on a faithful pruning asks whether the benchmark can tell at all: it compares a *faithful* pruning, "
              "one that keeps every answer of the unpruned model (retention 1 on every run), with each baseline by "
              "the same interval. Against a baseline it is not shown ahead of, no criterion can be shown ahead "
              "either, short of pruning that corrects the unpruned model (the highest retention of any run of the "
              "default or a baseline is in brackets). The bar (issue 12's, against every baseline compared here, "
              f"each with the selections it supports: {bar_baselines(rows)}; other settings of validated-choice do "
              "not count): met = ahead of every one; out of reach = every one the default is not shown ahead of "
              "is one a faithful pruning is not shown ahead of either; missed = those a faithful pruning is shown "
              "ahead of and the default is not; at other sparsities the bar is not asked.", "",
              "| model | sparsity | default | best baseline | ahead of | behind | no difference shown "
              "| a faithful pruning is not shown ahead of | the bar |",
              "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["sparsity"]), []).append(r)
    for (model, sparsity), group in groups.items():
        names = {v: [f"{r['method']} ({r['selection']})" for r in group if r["verdict"] == v]
                 for v in ("ahead", "behind", "no difference shown")}
        best = max(group, key=lambda r: r["fresh_baseline"])
        unreachable = [f"{r['method']} ({r['selection']}, +{r['faithful_mean']:.4f})" for r in group
                       if r["faithful_low"] <= 0]
        highest = max(r["highest_run_retention"] for r in group)
        lines.append(f"| {model} | {sparsity:.0%} | {group[0]['fresh_default']:.3f} | {best['fresh_baseline']:.3f} "
                     f"({best['method']}, {best['selection']}) | "
                     + " | ".join(", ".join(n) or "-" for n in names.values())
                     + f" | {', '.join(unreachable) or '-'} ({highest:.3f}) | {bar(group)} |")
    return lines


def not_run(data: dict) -> list[str]:
    """One line per method, selection, model and sparsity that was refused before any work, with the reason."""
    reasons: dict[tuple, str] = {}
    for key, reason in data.get("skipped", {}).items():
        model, _, _, method, selection, sparsity = key.split("|")
        reasons.setdefault((model, method, selection, float(sparsity)), reason)
    if not reasons:
        return []
    return ["", "Not run (refused before any work):"] + [
        f"- {method} ({selection}) on {model} at {sparsity:.0%}: {reason}"
        for (model, method, selection, sparsity), reason in reasons.items()]


def add_fresh_run_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """The arguments of a run scored on the fresh items (this script's and headroom.py's): the items, the
    calibration, and the results and report files (``out``: the default results file)."""
    parser.add_argument("--num-mc", type=int, default=400, help="fresh items per domain")
    parser.add_argument("--item-seed", type=int, default=7000, help="seed of the fresh items (original: 1000)")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(out))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--results", nargs="+", help="results files the report reads (default: --out)")
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--report", default=None, help="markdown file to write (default: print)")


def run_unless_report_only(parser: argparse.ArgumentParser, args: argparse.Namespace, run_models) -> None:
    """Unless ``--report-only``: refuse unknown ``--models`` by name, make ``--out``'s folder, ``run_models(args)``."""
    if args.report_only:
        return
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; allowed: {list(MODELS)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    run_models(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--zoo-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--default", default=DEFAULT,
                        help="the method compared (global selection), a quality_seeds.py label such as "
                             "validated-choice:compare_uniform=true")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES),
                        help="methods it is compared with (both selections; the default's label: global only)")
    add_fresh_run_arguments(parser, Path(__file__).parent / "results" / "fresh_items" / "all.json")
    parser.add_argument("--variant", default="plain", choices=VARIANTS,
                        help="what follows selection for every method of the run (cells labelled METHOD+VARIANT)")
    parser.add_argument("--judge-selection", action="store_true",
                        help="with a recalibrated --variant: also the default's global or uniform keep map, "
                             "whichever recalibration left with the lower calibration KL (METHOD+VARIANT+judged)")
    parser.add_argument("--recal-steps", type=int, default=32, help="recalibrated variants: optimiser steps")
    parser.add_argument("--recal-lr", type=float, default=3e-3, help="recalibrated variants: Adam learning rate")
    parser.add_argument("--recal-seed", type=int, default=0, help="recalibrated variants: batch order")
    parser.add_argument("--recal-scale-lr", type=float, default=3e-2,
                        help="recalibrated+scales: Adam learning rate of the output scales")
    parser.add_argument("--stored", nargs="*", default=None,
                        help="quality_seeds.py files to check runs against, oldest first")
    parser.add_argument("--title", default=TITLE,
                        help="the report's title (a page that compares a variant with the default says so)")
    args = parser.parse_args(argv)
    if args.judge_selection and "recalibrated" not in args.variant:
        parser.error("--judge-selection judges by recalibration's calibration KL: give a recalibrated --variant")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run_unless_report_only(parser, args, run)
    data = load(args.results or [args.out])
    num_original = data["meta"]["original_items"]["num_mc"] * len(data["meta"]["domains"])
    stored = None if args.stored is None else stored_check(data, args.stored, num_original)
    rows = comparisons(data, draws=args.draws, default=args.default, baselines=tuple(args.baselines))
    text = "\n".join(report(data, rows, stored, args.draws, args.default, args.title)) + "\n"
    publish(args.report, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
