"""Scoring time of the default criterion against REAP's on the zoo models, in one process, on the same tokens.

For each zoo model, calibration seed and sparsity (global selection), the run times REAP and validated_choice with
its defaults, and validated_choice with ``cache_mb=0`` (every masked forward computed in full, as before the
caches), one after the other on one thread. It checks that the two validated_choice runs keep the same experts
and report the same KLs (the caches must change the cost only) and writes the medians and ratios, with their
range over the cells, to benchmarks/ZOO_COST.md (hand notes below its notes marker are kept).

Usage (2-core CPU; the zoo models come from their cache, ``python -m diep_hub.zoo.build`` makes them):
    python benchmarks/zoo_cost.py --write
    python benchmarks/zoo_cost.py --models mixtral-8e --seeds 0 --sparsities 0.5
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
from quality import METHODS, calibration_ids, score, select
from report_notes import write_keeping_notes

from diep_hub.machine import machine_description
from diep_hub.zoo.train import HELDOUT, ZOO, build_zoo_model

logger = logging.getLogger("benchmarks.zoo_cost")
HERE = Path(__file__).resolve().parent
DEFAULT = METHODS["validated-choice"]
RUNS = {  # label -> (method, extra options)
    "reap": (METHODS["reap"], {}),
    "validated_choice": (DEFAULT, {}),
    "validated_choice (cache_mb=0)": (DEFAULT, {"cache_mb": 0}),
}


def time_cell(model, input_ids, *, seed: int, sparsity: float, batch_size: int) -> dict:
    """Seconds of each run in RUNS on one cell, and whether the cached and uncached choices agree exactly."""
    row, results = {}, {}
    for label, (method, extra) in RUNS.items():
        result, seconds = score(model, method, input_ids, seed=seed, batch_size=batch_size, extra=extra,
                                sparsity=sparsity, selection="global")
        row[label] = round(seconds, 3)
        results[label] = result
    cached, uncached = results["validated_choice"], results["validated_choice (cache_mb=0)"]
    same_keep = (select(cached.scores, model, sparsity=sparsity, mode="global")
                 == select(uncached.scores, model, sparsity=sparsity, mode="global"))
    same_kl = ({k: v["validation_kl"] for k, v in cached.details["candidates"].items()}
               == {k: v["validation_kl"] for k, v in uncached.details["candidates"].items()}
               and [r["validation_kl"] for r in cached.details["refinements"].values()]
               == [r["validation_kl"] for r in uncached.details["refinements"].values()])
    row["same_keep_map"], row["same_kls"] = same_keep, same_kl
    row["forward_passes"] = cached.details.get("forward_passes")
    row["forward_passes_uncached"] = uncached.details.get("forward_passes")
    return row


def model_rows(data: dict, model: str) -> list[dict]:
    """The timed cells of one zoo model in a zoo_cost results file."""
    return [row for key, row in data["cells"].items() if key.split("|")[0] == model]


def default_over_reap(rows: list[dict]) -> list[float]:
    """Per cell, the default's scoring time over REAP's (measured back to back)."""
    return [row["validated_choice"] / row["reap"] for row in rows]


def render(data: dict) -> str:
    meta = data["meta"]
    lines = [
        "# Scoring time of the default against REAP on the zoo models",
        "",
        f"Command: `{meta['command']}` (whole run {meta['seconds']:.0f} s).",
        f"Machine: {meta['machine']}; one thread; every run of a cell in one process, one after the other.",
        f"Calibration: {meta['num_samples']} x {meta['seq_len']} tokens (batch {meta['batch_size']}), seeds "
        f"{meta['seeds']}, sparsities {meta['sparsities']}, global selection; validated_choice with its defaults "
        "(REAP, frequency and soft frequency judged; the winner's keep map refined, 4 probes each way a layer).",
        "",
        "`cache_mb=0` computes every masked forward in full (the default before the caches); the default keeps the "
        "unpruned log-probabilities of its sequences and resumes each refinement probe from the layer it changes "
        "(diep_hub/criteria/masked_kl.py). Ratios are medians over the cells of per-cell ratios (each cell's runs "
        "measured back to back), with their range.",
        "",
        "| model | cells | REAP s | default s | default / REAP | cache_mb=0 / REAP | speed-up from the caches | "
        "same keep maps and KLs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in meta["models"]:
        rows = model_rows(data, model)
        if not rows:
            continue
        reap = [r["reap"] for r in rows]
        default = [r["validated_choice"] for r in rows]
        ratio = default_over_reap(rows)
        ratio0 = [r["validated_choice (cache_mb=0)"] / r["reap"] for r in rows]
        speedup = [r["validated_choice (cache_mb=0)"] / r["validated_choice"] for r in rows]
        same = sum(r["same_keep_map"] and r["same_kls"] for r in rows)

        def spread(values: list[float]) -> str:
            return f"{statistics.median(values):.1f}x ({min(values):.1f}-{max(values):.1f})"

        held = " (held-out)" if model in HELDOUT else ""
        lines.append(
            f"| {model}{held} | {len(rows)} | {statistics.median(reap):.2f} | {statistics.median(default):.2f} | "
            f"{spread(ratio)} | {spread(ratio0)} | {spread(speedup)} | {same} of {len(rows)} |")
    return "\n".join(lines) + "\n"


def add_cell_arguments(parser: argparse.ArgumentParser) -> None:
    """The cells a run covers: zoo models, calibration seeds, sparsities, and the calibration size."""
    parser.add_argument("--models", nargs="+", default=["mixtral-8e", "olmoe-16e", *HELDOUT])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)


def zoo_cells(args):
    """(model name, model, calibration seed, sparsity, calibration ids) for every cell of ``args`` (zoo seed 0 of
    each model, from its cache), models loaded once; refuses unknown models first."""
    unknown = [m for m in args.models if m not in ZOO and m not in HELDOUT]
    if unknown:
        raise SystemExit(f"unknown zoo model(s) {unknown}; choose from {[*ZOO, *HELDOUT]}")
    for name in args.models:
        model, tokenizer = build_zoo_model(name, seed=0)
        for seed in args.seeds:
            input_ids = calibration_ids(tokenizer, args.num_samples, args.seq_len, seed)
            for sparsity in args.sparsities:
                yield name, model, seed, sparsity, input_ids


def cells_meta(args, command: str, seconds: float) -> dict:
    """What a results file records of its run: command, machine, cells and calibration size."""
    return {"command": command, "machine": machine_description(), "models": args.models, "seeds": args.seeds,
            "sparsities": args.sparsities, "num_samples": args.num_samples, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cell_arguments(parser)
    parser.add_argument("--out", default=str(HERE / "results" / "zoo_cost.json"))
    parser.add_argument("--write", action="store_true", help="write benchmarks/ZOO_COST.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("diep_hub").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = {"meta": {}, "cells": {}}
    for name, model, seed, sparsity, input_ids in zoo_cells(args):
        row = time_cell(model, input_ids, seed=seed, sparsity=sparsity, batch_size=args.batch_size)
        data["cells"][f"{name}|seed{seed}|{sparsity}"] = row
        logger.info("%s seed %d %.2f: %s", name, seed, sparsity, row)
        if not (row["same_keep_map"] and row["same_kls"]):
            logger.error("%s seed %d %.2f: the caches changed the result", name, seed, sparsity)
    command = "python benchmarks/zoo_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data["meta"] = cells_meta(args, command, time.perf_counter() - start)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1), encoding="utf-8")
    table = render(data)
    print(table)
    if args.write:
        write_keeping_notes(HERE / "ZOO_COST.md", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
