"""Quality benchmark: prune every zoo model with every criterion and compare what survives.

For each zoo model (:mod:`diep_hub.zoo`), each criterion (DiEP in both search modes, REAP, frequency, soft
frequency, NAEE where its subset search is feasible, random), each selection (global, uniform) and each
sparsity (25%, 50%), the model is pruned and evaluated on the zoo tasks (per-domain multiple choice, exact
match and loss); retention = pruned / unpruned. Scores are computed once per (model, criterion) and reused
for every selection and sparsity (except NAEE, which needs the per-layer counts); one configuration per
model is also run end to end through ``DiEPPruner`` to check that it makes the same keep map.

Usage (2-core CPU, ~10-20 minutes for everything):
    nice -n 10 python benchmarks/quality.py                      # main table, RESULTS.md and plots
    nice -n 10 python benchmarks/quality.py --ablation           # DiEP variants (ranking, lambda, steps...)
    nice -n 10 python benchmarks/quality.py --models mixtral-8e --methods diep-gated random --quick
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from quality_report import merge_write, write_report

from diep_hub import DiEPPruner, get_family, prune_experts
from diep_hub.criteria.base import ScoringContext, get_criterion
from diep_hub.errors import DiEPError
from diep_hub.machine import machine_description
from diep_hub.selection import select_experts
from diep_hub.zoo import domains
from diep_hub.zoo.tasks import evaluate_zoo, retention
from diep_hub.zoo.train import EXTRA, HELDOUT, ZOO, build_zoo_model

logger = logging.getLogger("benchmarks.quality")
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Method:
    """A row label, the registered criterion, and its options."""

    label: str
    criterion: str
    options: dict = field(default_factory=dict)


METHODS = {
    m.label: m
    for m in (
        Method("diep-removal", "diep_removal"),  # removal-aware search (criteria/removal.py)
        Method("diep", "diep"),  # the shipped defaults: mode "auto" (gated or dense by family), 10 epochs
        Method("diep-gated", "diep", {"mode": "gated", "epochs": 30}),
        Method("diep-dense", "diep", {"mode": "dense", "epochs": 10}),  # the paper's Eq. 5 and hyper-parameters
        Method("reap", "reap"),
        Method("frequency", "frequency"),
        Method("soft_frequency", "soft_frequency"),
        Method("naee", "naee"),
        Method("random", "random"),
        Method("validated-choice", "validated_choice"),  # reap/frequency/soft_frequency judged on held-out tokens
    )
}
SELECTIONS = ("global", "uniform")
SPARSITIES = (0.25, 0.5)

# DiEP variants for the ablation (--ablation): each changes one thing from the paper's hyper-parameters (lr 5e-3,
# 10 epochs, lambda 0.01, 3:1, 128 samples) in one search mode. Epochs are spelled out, so the variants do not move
# when the shipped defaults change.
PAPER = {"epochs": 10}
ABLATION = {
    "gated, paper settings": {"mode": "gated", **PAPER},
    "dense, paper settings": {"mode": "dense", **PAPER},
    "gated, raw alpha*beta": {"mode": "gated", **PAPER, "ranking": "raw"},
    "dense, raw alpha*beta": {"mode": "dense", **PAPER, "ranking": "raw"},
    "gated, lambda=1": {"mode": "gated", **PAPER, "lambda": 1.0},
    "dense, lambda=0": {"mode": "dense", **PAPER, "lambda": 0.0},
    "dense, lambda=1": {"mode": "dense", **PAPER, "lambda": 1.0},
    "gated, 30 epochs": {"mode": "gated", "epochs": 30},
    "dense, 30 epochs": {"mode": "dense", "epochs": 30},
    "gated, lr=5e-2": {"mode": "gated", **PAPER, "lr": 5e-2},
    "dense, lr=5e-2": {"mode": "dense", **PAPER, "lr": 5e-2},
    "dense, alpha only (1:0)": {"mode": "dense", **PAPER, "alternation": (1, 0)},
}


def calibration_texts(num_samples: int, seed: int) -> list[str]:
    """Calibration documents from the zoo generator (its calibration split, not the training stream)."""
    return domains.corpus_texts(num_samples, seed=seed, split="calibration", lines_per_text=12)


def calibration_ids(tokenizer, num_samples: int, seq_len: int, seed: int) -> torch.LongTensor:
    """[num_samples, seq_len] tokens packed by the project's calibration loader, exactly as DiEPPruner does."""
    from diep_hub.calibration import load_calibration_data

    texts = calibration_texts(num_samples, seed)
    return load_calibration_data(texts, tokenizer, num_samples=num_samples, seq_len=seq_len, seed=seed)


def select(scores: dict[int, torch.Tensor], model, *, sparsity: float, mode: str) -> dict[int, list[int]]:
    """The keep map, through the project's selection (``diep_hub.selection.select_experts``)."""
    return select_experts(scores, model, sparsity=sparsity, mode=mode).keep


def uniform_counts(model, sparsity: float) -> dict[int, int]:
    """Experts each layer keeps under uniform selection (what NAEE's subset search needs up front)."""
    keep = select(
        {
            layer.index: torch.arange(layer.num_experts, dtype=torch.float32)
            for layer in get_family(model).moe_layers(model)
        },
        model,
        sparsity=sparsity,
        mode="uniform",
    )
    return {index: len(ids) for index, ids in keep.items()}


def score(
    model, method: Method, input_ids, *, seed: int, batch_size: int, num_to_keep=None, extra=None, sparsity=None,
    selection=None,
):
    """Run one criterion on a model (weights untouched); returns (ScoreResult, seconds). ``selection``: the mode
    whose keep maps a criterion that compares them (validated_choice) is told, with ``sparsity``."""
    family = get_family(model)
    criterion = get_criterion(method.criterion)()
    options = {**method.options, **(extra or {})}
    if method.criterion in ("diep", "diep_removal", "validated_choice"):
        options.setdefault("progress", False)
    context = ScoringContext(
        model=model,
        family=family,
        layers=family.moe_layers(model),
        input_ids=input_ids,
        batch_size=batch_size,
        seed=seed,
        num_to_keep=num_to_keep,
        sparsity=sparsity,
        options=options,
        select=None if selection is None else (
            lambda scores, mode=None: select_experts(scores, model, sparsity=sparsity, mode=mode or selection)),
    )
    start = time.perf_counter()
    result = criterion.score(context)
    return result, time.perf_counter() - start


def evaluate_pruned(model, tokenizer, keep: dict[int, list[int]], eval_kwargs: dict) -> dict:
    pruned = prune_experts(copy.deepcopy(model), keep)
    return evaluate_zoo(pruned, tokenizer, **eval_kwargs)


def check_against_pruner(
    model,
    tokenizer,
    method: Method,
    texts,
    *,
    sparsity,
    selection,
    num_samples,
    seq_len,
    batch_size,
    seed,
    expected: dict[int, list[int]],
) -> bool:
    """Prune a copy end to end with ``DiEPPruner``; True if its keep map equals the staged one."""
    pruner = DiEPPruner(
        sparsity=sparsity,
        method=method.criterion,
        selection=selection,
        dataset=texts,
        dataset_config=None,
        progress=False,
        num_samples=num_samples,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        **_pruner_options(method),
    )
    pruned = pruner.prune_model(copy.deepcopy(model), tokenizer)
    kept = {i: list(ids) for i, ids in enumerate(pruned.config.kept_expert_ids) if ids is not None}
    same = kept == {i: sorted(ids) for i, ids in expected.items()}
    if not same:
        logger.warning("DiEPPruner keep map %s differs from the staged one %s", kept, expected)
    return same


def _pruner_options(method: Method) -> dict:
    """How a method's criterion options are spelled for DiEPPruner (its search hyper-parameters)."""
    names = {"mode": "search_mode", "lambda": "lambda_"}
    return {names.get(k, k): v for k, v in method.options.items()}


def run_model(name: str, methods: list[Method], args) -> dict:
    """Every (method, selection, sparsity) of one zoo model; returns its results block."""
    model, tokenizer = build_zoo_model(name, seed=args.seed)
    eval_kwargs = dict(num_mc=args.num_mc, num_em=args.num_em, num_loss=args.num_loss, seed=1000)
    start = time.perf_counter()
    base = evaluate_zoo(model, tokenizer, **eval_kwargs)
    logger.info("%s unpruned: %s (%.1fs)", name, base["macro"], time.perf_counter() - start)
    input_ids = calibration_ids(tokenizer, args.num_samples, args.seq_len, args.seed)
    block = {"model": name, "base": base, "runs": [], "layer_counts": {}}
    for method in methods:
        cached = None
        for sparsity in args.sparsities:
            for selection in args.selections:
                row = {"method": method.label, "selection": selection, "sparsity": sparsity}
                try:
                    if method.criterion == "naee":
                        if selection != "uniform":
                            row["skipped"] = "NAEE searches subsets of a fixed size per layer: uniform only"
                            block["runs"].append(row)
                            continue
                        result, secs = score(
                            model,
                            method,
                            input_ids,
                            seed=args.seed,
                            batch_size=args.batch_size,
                            num_to_keep=uniform_counts(model, sparsity),
                        )
                    else:
                        if cached is None:
                            cached = score(model, method, input_ids, seed=args.seed, batch_size=args.batch_size)
                        result, secs = cached
                    keep = select(result.scores, model, sparsity=sparsity, mode=selection)
                except DiEPError as exc:
                    row["skipped"] = str(exc)
                    block["runs"].append(row)
                    logger.warning("%s %s %.2f: %s", method.label, selection, sparsity, exc)
                    continue
                res = evaluate_pruned(model, tokenizer, keep, eval_kwargs)
                row.update(
                    score_seconds=round(secs, 1),
                    kept={str(k): len(v) for k, v in keep.items()},
                    macro=res["macro"],
                    retention=retention(res, base),
                    domains={d: m["mc_acc"] for d, m in res["domains"].items()},
                )
                block["runs"].append(row)
                logger.info(
                    "%s %-14s %-7s %.2f  mc %.3f  em %.3f  loss %.3f  kept %s",
                    name,
                    method.label,
                    selection,
                    sparsity,
                    res["macro"]["mc_acc"],
                    res["macro"]["em_acc"],
                    res["macro"]["loss"],
                    row["kept"],
                )
                if method.label.startswith("diep") and selection == "global":
                    block["layer_counts"][f"{method.label}@{sparsity}"] = row["kept"]
        if args.check_pruner and method.label == "diep" and cached is not None:
            keep = select(cached[0].scores, model, sparsity=0.5, mode="global")
            block["pruner_agrees"] = check_against_pruner(
                model,
                tokenizer,
                method,
                calibration_texts(args.num_samples, args.seed),
                sparsity=0.5,
                selection="global",
                num_samples=args.num_samples,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                seed=args.seed,
                expected=keep,
            )
    return block


def run_ablation(name: str, args) -> dict:
    """DiEP variants on one model at each sparsity, global selection (plus calibration size)."""
    model, tokenizer = build_zoo_model(name, seed=args.seed)
    eval_kwargs = dict(num_mc=args.num_mc, num_em=args.num_em, num_loss=args.num_loss, seed=1000)
    base = evaluate_zoo(model, tokenizer, **eval_kwargs)
    variants = [(label, opts, args.num_samples) for label, opts in ABLATION.items()]
    variants += [
        ("gated, 32 samples", {"mode": "gated", **PAPER}, 32),
        ("gated, 30 epochs, 32 samples", {"mode": "gated", "epochs": 30}, 32),
    ]
    if args.variants:
        unknown = sorted(set(args.variants) - {v[0] for v in variants})
        if unknown:
            raise SystemExit(f"unknown ablation variant(s) {unknown}; choose from {[v[0] for v in variants]}")
        variants = [v for v in variants if v[0] in args.variants]
    rows = []
    for label, opts, num_samples in variants:
        input_ids = calibration_ids(tokenizer, num_samples, args.seq_len, args.seed)
        result, secs = score(model, Method(label, "diep", opts), input_ids, seed=args.seed, batch_size=args.batch_size)
        for sparsity, selection in [(s, m) for s in args.sparsities for m in args.selections]:
            keep = select(result.scores, model, sparsity=sparsity, mode=selection)
            res = evaluate_pruned(model, tokenizer, keep, eval_kwargs)
            rows.append(
                {
                    "variant": label,
                    "selection": selection,
                    "sparsity": sparsity,
                    "score_seconds": round(secs, 1),
                    "kept": {str(k): len(v) for k, v in keep.items()},
                    "macro": res["macro"],
                    "retention": retention(res, base),
                }
            )
            logger.info(
                "%s %-26s %.2f mc %.3f em %.3f kept %s",
                name,
                label,
                sparsity,
                res["macro"]["mc_acc"],
                res["macro"]["em_acc"],
                rows[-1]["kept"],
            )
    return {"model": name, "base": base, "rows": rows}


def _write_report(results_dir: Path, target: Path) -> None:
    """The report (quality_report.py), with this module's method order and selections."""
    write_report(results_dir, target, method_order=list(METHODS), selections=SELECTIONS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO) + list(EXTRA) + list(HELDOUT))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--selections", nargs="+", default=list(SELECTIONS), choices=SELECTIONS)
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-mc", type=int, default=100)
    parser.add_argument("--num-em", type=int, default=50)
    parser.add_argument("--num-loss", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="fewer evaluation items (smoke runs)")
    parser.add_argument("--ablation", action="store_true", help="run the DiEP ablation instead of the main table")
    parser.add_argument("--variants", nargs="+", default=None, help="ablation variants to run (default: all)")
    parser.add_argument("--check-pruner", action="store_true", help="also prune once through DiEPPruner")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the raw JSON results")
    parser.add_argument("--report-only", action="store_true", help="only regenerate RESULTS.md and the plots")
    parser.add_argument("--report", default=str(HERE / "RESULTS.md"),
                        help="the Markdown report to (re)write; its plots go beside it (default benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_mc, args.num_em, args.num_loss = 40, 20, 20
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        _write_report(out, Path(args.report))
        return 0
    meta = {
        "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_description(),
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
    }
    if args.ablation:
        blocks = [run_ablation(name, args) for name in args.models]
        merge_write(out / "ablation.json", meta, blocks)
        _write_report(out, Path(args.report))
        return 0
    else:
        blocks = [run_model(name, [METHODS[m] for m in args.methods], args) for name in args.models]
        merge_write(out / "quality.json", meta, blocks)
    _write_report(out, Path(args.report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
