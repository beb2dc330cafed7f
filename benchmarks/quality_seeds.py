"""Quality over calibration seeds: every criterion x selection x sparsity on the zoo models, mean and spread.

Each seed draws other calibration documents and seeds the search, so a cell's spread is what a user re-running
with another sample would see. Models are split into tuning models (defaults are chosen on them) and held-out
models (only used to confirm); the report says which is which. Results are written after every cell and a rerun
skips the cells already in the JSON file, so a long run can be resumed.

Variants (``--variants``): what is done with a keep map besides surgery. ``plain`` is surgery alone;
``merged`` folds each removed expert into its most similar kept one first (``diep_hub.merging``); ``recalibrated``
distils the pruned layers' routers towards the unpruned model afterwards (``diep_hub.recalibration``);
``merged+recalibrated`` does both; ``recalibrated+scales`` also trains one output scale per kept expert
(``output_scales=True``). A plain cell keeps the key it always had; the others add ``|<variant>``.

Usage (2-core CPU):
    nice -n 10 python benchmarks/quality_seeds.py --models mixtral-8e olmoe-16e qwen2moe-8e-shared \
        --heldout mixtral-8e-wide --seeds 0 1 2
    python benchmarks/quality_seeds.py --models mixtral-8e --variants plain merged recalibrated \
        --out benchmarks/results/variants/mixtral-8e.json --report benchmarks/QUALITY_VARIANTS.md
    python benchmarks/quality_seeds.py --report-only
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import statistics
import sys
import time
from pathlib import Path

from quality import METHODS, Method, calibration_ids, evaluate_pruned, score, select, uniform_counts
from report_notes import header, write_keeping_notes

from diep_hub import prune_experts
from diep_hub.criteria.base import get_criterion
from diep_hub.errors import DiEPError
from diep_hub.machine import machine_description
from diep_hub.merging import merge_removed_experts
from diep_hub.recalibration import recalibrate_routers, teacher_hidden_states
from diep_hub.zoo.tasks import evaluate_zoo
from diep_hub.zoo.train import build_zoo_model

logger = logging.getLogger("benchmarks.quality_seeds")
HERE = Path(__file__).resolve().parent
EVAL = dict(num_mc=100, num_em=0, num_loss=50, seed=1000)
VARIANTS = ("plain", "merged", "recalibrated", "merged+recalibrated", "recalibrated+scales")


def parse_method(label: str) -> Method:
    """A row of quality.METHODS, or a variant spelled ``LABEL:option=value,...`` (e.g. ``diep-removal:epochs=10``,
    ``validated-choice:candidates=["reap","diep_removal"]``) whose options override that row's."""
    base, _, spec = label.partition(":")
    if base not in METHODS:
        raise SystemExit(f"unknown method {base!r}; choose from {list(METHODS)} (optionally LABEL:opt=value,...)")
    options = dict(METHODS[base].options)
    for item in filter(None, re.split(r",(?![^\[]*\])", spec)):  # a comma inside [...] belongs to a JSON list
        key, _, value = item.partition("=")
        options[key] = json.loads(value) if value[:1].isdigit() or value[:1] in "-[{" else value
    return Method(label, METHODS[base].criterion, options)


def cell_key(model: str, seed: int, method: str, selection: str, sparsity: float, variant: str = "plain") -> str:
    """``model|seed|method|selection|sparsity``, plus ``|variant`` for anything but plain surgery (so the keys of
    earlier runs stay valid)."""
    key = f"{model}|{seed}|{method}|{selection}|{sparsity:g}"
    return key if variant == "plain" else f"{key}|{variant}"


def split_key(key: str) -> tuple[str, ...]:
    """(model, seed, method, selection, sparsity, variant) of a cell key; old keys are plain."""
    parts = tuple(key.split("|"))
    return parts if len(parts) == 6 else (*parts, "plain")


def prune_variant(model, keep, variant: str, input_ids, teacher, args) -> tuple[object, dict]:
    """A pruned copy of ``model`` for one variant, and what the variant did (for the cell)."""
    work = copy.deepcopy(model)
    info: dict = {}
    if "merged" in variant:
        record = merge_removed_experts(
            work, keep, input_ids, batch_size=args.batch_size, similarity=args.merge_similarity
        )
        info["merged"] = record.num_merged
    pruned = prune_experts(work, keep)
    if "recalibrated" in variant:
        record = recalibrate_routers(
            pruned, teacher, input_ids, batch_size=args.batch_size, steps=args.recal_steps, lr=args.recal_lr,
            seed=args.recal_seed, output_scales="scales" in variant, output_scale_lr=args.recal_scale_lr,
        )
        info["recalibration"] = {
            "kl_before": round(record.loss_before, 6),
            "kl_after": round(record.loss_after, 6),
            "applied": record.applied,
            "seconds": round(record.seconds, 1),
        }
        if record.output_scales:
            scales = [v for layer in record.output_scales.values() for v in layer]
            info["recalibration"]["output_scales"] = [round(min(scales), 4), round(max(scales), 4)]
    return pruned, info


def run(args) -> None:
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"meta": {}, "base": {}, "cells": {}}
    if data["cells"] and data["meta"].get("zoo_seed", 0) != args.zoo_seed:  # older files: zoo seed 0 builds
        raise SystemExit(f"{out} holds cells of zoo seed {data['meta'].get('zoo_seed', 0)}, not --zoo-seed "
                         f"{args.zoo_seed}: one results file per instance of the zoo")
    data["meta"]["zoo_seed"] = args.zoo_seed
    data["meta"].update(machine=machine_description(), eval=EVAL, num_samples=args.num_samples, seq_len=args.seq_len)
    if args.variants != ["plain"]:
        data["meta"]["variant_settings"] = {
            "merge_similarity": args.merge_similarity,
            "recal_steps": args.recal_steps,
            "recal_lr": args.recal_lr,
            "recal_seed": args.recal_seed,
            "recal_scale_lr": args.recal_scale_lr,
            "batch_size": args.batch_size,
        }
    data["meta"]["tuning"] = sorted(set(data["meta"].get("tuning", [])) | set(args.models))
    data["meta"]["heldout"] = sorted(set(data["meta"].get("heldout", [])) | set(args.heldout))
    commands = data["meta"].setdefault("commands", [])
    command = "python benchmarks/quality_seeds.py " + " ".join(sys.argv[1:])
    if command not in commands:
        commands.append(command)
    methods = [parse_method(label) for label in args.methods]
    for name in [*args.models, *args.heldout]:
        model, tokenizer = build_zoo_model(name, seed=args.zoo_seed)
        if name not in data["base"]:
            data["base"][name] = evaluate_zoo(model, tokenizer, **EVAL)["macro"]
        base_mc = data["base"][name]["mc_acc"]
        for seed in args.seeds:
            input_ids = calibration_ids(tokenizer, args.num_samples, args.seq_len, seed)
            teacher = None
            if any("recalibrated" in v for v in args.variants):
                teacher = teacher_hidden_states(model, input_ids, batch_size=args.batch_size)
            for method in methods:
                _run_method(model, tokenizer, name, seed, method, input_ids, base_mc, data, args, teacher)
                out.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _run_method(model, tokenizer, name, seed, method: Method, input_ids, base_mc, data, args, teacher=None) -> None:
    criterion = get_criterion(method.criterion)
    cached = None
    for sparsity in args.sparsities:
        for selection in args.selections:
            keys = {v: cell_key(name, seed, method.label, selection, sparsity, v) for v in args.variants}
            todo = [v for v, key in keys.items() if key not in data["cells"]]
            if not todo:
                continue
            if selection not in criterion.selections:
                continue
            try:
                if criterion.needs_target_counts or criterion.needs_sparsity:
                    result, secs = score(
                        model,
                        method,
                        input_ids,
                        seed=seed,
                        batch_size=args.batch_size,
                        num_to_keep=uniform_counts(model, sparsity) if selection == "uniform" else None,
                        sparsity=sparsity,
                        selection=selection,
                    )
                else:
                    if cached is None:
                        cached = score(model, method, input_ids, seed=seed, batch_size=args.batch_size)
                    result, secs = cached
                keep = select(result.scores, model, sparsity=sparsity, mode=selection)
            except DiEPError as exc:
                for v in todo:
                    data["cells"][keys[v]] = {"skipped": str(exc)}
                logger.warning("%s: %s", keys[todo[0]], exc)
                continue
            for variant in todo:
                key = keys[variant]
                if variant == "plain":
                    res, info = evaluate_pruned(model, tokenizer, keep, EVAL), {}
                else:
                    pruned, info = prune_variant(model, keep, variant, input_ids, teacher, args)
                    res = evaluate_zoo(pruned, tokenizer, **EVAL)
                data["cells"][key] = {
                    "mc": res["macro"]["mc_acc"],
                    "loss": res["macro"]["loss"],
                    "retention": res["macro"]["mc_acc"] / base_mc,
                    "kept": [len(keep[k]) for k in sorted(keep)],
                    "score_seconds": round(secs, 2),
                    **choice_record(result),
                    **info,
                }
                logger.info("%s  mc %.3f  kept %s  (%.1fs) %s", key, res["macro"]["mc_acc"],
                            data["cells"][key]["kept"], secs, info or "")


def choice_record(result) -> dict:
    """What validated_choice chose and each candidate's held-out KL (empty for other criteria)."""
    if "chosen" not in result.details:
        return {}
    kls = {name: round(c["validation_kl"], 6) for name, c in result.details["candidates"].items()}
    record = {"chosen": result.details["chosen"], "validation_kl": kls}
    refinement = result.details.get("refinement")
    if refinement:
        record["refinement"] = {"moves": len(refinement["moves"]), "accepted": refinement["accepted"],
                                "validation_kl": refinement["validation_kl"]}
        if "applied" in refinement:
            record["refinement"]["applied"] = refinement["applied"]
    refinements = result.details.get("refinements") or {}
    if len(refinements) > 1:  # every refined candidate: moves, held-out KL and (when it beat its own map) gain in SE
        record["refinements"] = {label: {"moves": len(r["moves"]), "validation_kl": r["validation_kl"],
                                         "gain_se": r.get("gain_se")} for label, r in refinements.items()}
    return record


def merge(parts: list[dict]) -> dict:
    """One results dict from several runs (one file per model, so that runs in parallel never share a file)."""
    merged: dict = {"meta": {"commands": [], "tuning": [], "heldout": []}, "base": {}, "cells": {}}
    for part in parts:
        meta = part["meta"]
        for key in ("commands", "tuning", "heldout"):
            merged["meta"][key] += [v for v in meta.get(key, []) if v not in merged["meta"][key]]
        for key in ("machine", "eval", "num_samples", "seq_len", "note", "variant_settings"):
            merged["meta"].setdefault(key, meta.get(key))
        merged["base"].update(part["base"])
        merged["cells"].update(part["cells"])
    return merged


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def choices_table(cells: dict, models: list[str], sparsities: list[float]) -> list[str]:
    """What validated_choice chose in each plain cell, seed by seed (empty when no cell records a choice)."""
    chosen = {k: v["chosen"] for k, v in cells.items() if "chosen" in v and k[5] == "plain"}
    if not chosen:
        return []
    lines = ["## What validated_choice chose (plain cells; seeds in order)", "",
             "| model | selection | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---|---|" + "---|" * len(sparsities)]
    for m in models:
        for selection in sorted({k[3] for k in chosen if k[0] == m}):
            row = []
            for s in sparsities:
                picks = [v for k, v in sorted(chosen.items(), key=lambda kv: int(kv[0][1]))
                         if k[0] == m and k[3] == selection and k[4] == f"{s:g}"]
                row.append(", ".join(picks))
            lines.append(f"| {m} | {selection} | " + " | ".join(row) + " |")
    return [*lines, ""]


def report(data: dict, path: Path) -> None:
    """RESULTS-style markdown: per model and on average, mean +- std over seeds of MC retention."""
    cells = {split_key(k): v for k, v in data["cells"].items() if "retention" in v}
    models = [m for m in [*data["meta"]["tuning"], *data["meta"]["heldout"]] if any(k[0] == m for k in cells)]
    order = list(METHODS)
    variant_order = list(VARIANTS)
    rows = sorted(
        {(k[2], k[3], k[5]) for k in cells},
        key=lambda r: (order.index(r[0].partition(":")[0]), r[0], r[1], variant_order.index(r[2])),
    )
    with_variants = any(r[2] != "plain" for r in rows)
    sparsities = sorted({float(k[4]) for k in cells})
    seeds = sorted({int(k[1]) for k in cells})
    meta = data["meta"]
    title = "Quality over calibration seeds: mean and spread of multiple-choice retention"
    lines = header(title, meta["commands"], meta["machine"]) + [
        f"Calibration: {meta['num_samples']} zoo documents x {meta['seq_len']} tokens per seed, drawn with the seed "
        f"(seeds {seeds}); the seed also seeds the search. Evaluation: {EVAL['num_mc']} held-out 4-way "
        "multiple-choice items per domain (chance 0.25), macro over the 7 domains; retention = pruned / unpruned.",
        f"Tuning models (defaults chosen on these): {', '.join(meta['tuning'])}. "
        f"Held-out models (never used to choose): {', '.join(meta['heldout']) or 'none'}.",
        "",
        "Cells: mean +- standard deviation over seeds (n = number of seeds).",
        "",
    ]
    if meta.get("variant_settings"):
        settings = ", ".join(f"{k} {v}" for k, v in meta["variant_settings"].items())
        scales = ("; recalibrated+scales = the same, with one trained output scale per kept expert"
                  if any("scales" in r[2] for r in rows) else "")
        lines[-1:-1] = [f"Variants: plain = surgery alone; merged = diep_hub.merging before surgery; recalibrated = "
                        f"diep_hub.recalibration after it{scales} ({settings}).", ""]
    if meta.get("note"):
        lines[-1:-1] = [f"Note: {meta['note']}.", ""]

    def table(title: str, names: list[str]) -> None:
        variant_column = "variant | " if with_variants else ""
        lines.extend([f"## {title}", "", f"| method | selection | {variant_column}"
                      + " | ".join(f"{s:.0%}" for s in sparsities) + " |"])
        lines.append("|---|---|" + ("---|" if with_variants else "") + "---|" * len(sparsities))
        for method, selection, variant in rows:
            out = []
            for s in sparsities:
                # per seed: mean over the models, so the spread is that of the average a user would see
                per_seed = []
                for seed in seeds:
                    vals = [cells.get((m, str(seed), method, selection, f"{s:g}", variant)) for m in names]
                    if all(v is not None for v in vals):
                        per_seed.append(statistics.fmean(v["retention"] for v in vals))
                mean, spread = _stats(per_seed) if per_seed else (0.0, 0.0)
                out.append(f"{mean:.3f} +- {spread:.3f} (n={len(per_seed)})" if per_seed else "")
            if any(out):
                shown = f"{variant} | " if with_variants else ""
                lines.append(f"| {method} | {selection} | {shown}" + " | ".join(out) + " |")
        lines.append("")

    tuning = [m for m in meta["tuning"] if m in models]
    heldout = [m for m in meta["heldout"] if m in models]
    if tuning:
        table(f"Mean over the tuning models ({', '.join(tuning)})", tuning)
    if heldout:
        table(f"Mean over the held-out models ({', '.join(heldout)})", heldout)
    for m in models:
        table(f"{m} (unpruned MC {data['base'][m]['mc_acc']:.3f})", [m])
    lines.extend(choices_table(cells, models, sparsities))
    write_keeping_notes(path, "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[], help="tuning models")
    parser.add_argument("--heldout", nargs="*", default=[], help="held-out models")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="quality.METHODS rows or LABEL:opt=v,...")
    parser.add_argument("--selections", nargs="+", default=["global", "uniform"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--zoo-seed", type=int, default=0,
                        help="which instance of the zoo: the seed its models were trained with (diep_hub.zoo.build)")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--variants", nargs="+", default=["plain"], choices=VARIANTS,
                        help="what follows selection: plain surgery, merging first, router recalibration after, both")
    parser.add_argument("--merge-similarity", default="output_cosine", help="merged variants: diep_hub.merging")
    parser.add_argument("--recal-steps", type=int, default=32, help="recalibrated variants: optimiser steps")
    parser.add_argument("--recal-lr", type=float, default=1e-3, help="recalibrated variants: Adam learning rate")
    parser.add_argument("--recal-seed", type=int, default=0, help="recalibrated variants: batch order")
    parser.add_argument("--recal-scale-lr", type=float, default=3e-2,
                        help="recalibrated+scales: Adam learning rate of the output scales")
    parser.add_argument("--out", default=None, help="results JSON (default: results/seeds/<first model>.json)")
    parser.add_argument("--report", default=str(HERE / "QUALITY_SEEDS.md"))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--results", nargs="*", default=None,
                        help="result files the report merges (default: every results/seeds/*.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    if not args.report_only:
        if args.out is None:
            args.out = str(HERE / "results" / "seeds" / f"{[*args.models, *args.heldout][0]}.json")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        run(args)
    files = args.results
    if files is None:
        files = sorted(str(p) for p in (HERE / "results" / "seeds").glob("*.json"))
    report(merge([json.loads(Path(f).read_text()) for f in files]), Path(args.report))
    logger.info("done in %.0f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
