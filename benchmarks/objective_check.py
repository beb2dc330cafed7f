"""Objective check: would an objective computed on calibration text have found the headroom oracle's keep maps?

HEADROOM.md's oracle climbs with the task itself (choice cross-entropy on search items) and finds keep maps that
keep more than every baseline where the default's masked-KL search (SEARCH_LIMIT.md) finds none. A criterion sees
calibration text only. This script asks, for each headroom run, how two objectives that a criterion could compute
rank the run's keep maps (each start: the default's and every baseline's, and the oracle's):

- ``kl``: the default's objective, mean per-token KL(unpruned || pruned) of the next-token distribution;
- ``nll``: the pruned model's own next-token negative log-likelihood of the text (what is right, not what the
  unpruned model says).

Both are measured on calibration text that no criterion saw in the run (calibration seed ``--text-seed``), with
the keep map applied as the judge applies it (the router masked). For each run the report gives each objective's
rank correlation with the fresh-item retention over the run's keep maps, and whether it prefers the oracle's map
to the start the oracle climbed from. A diagnostic: it changes no default.

Usage (2-core CPU, from benchmarks/, under a minute a draw of text):
    python objective_check.py --headroom results/headroom/olmoe-16e-other-builds-wide.json \
        results/headroom/deepseek-v3-16e-groups-other-builds-wide.json \
        --out results/objective_check/other-builds-wide.json --report OBJECTIVE_CHECK.md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from fresh_items import unpack
from quality import calibration_ids
from report_notes import header, publish
from scipy.stats import spearmanr

from diep_hub.criteria.choice import masked_kl
from diep_hub.criteria.router_bias import removal_bias, router_logit_bias
from diep_hub.evaluation.perplexity import perplexity_of_ids
from diep_hub.families import get_family
from diep_hub.machine import machine_description
from diep_hub.zoo.train import build_zoo_model

logger = logging.getLogger("benchmarks.objective_check")

OBJECTIVES = ("kl", "nll")


def masked_nll(model, layers, keep_maps: list[dict[int, list[int]]], sequences: torch.Tensor,
               batch_size: int) -> list[float]:
    """Mean next-token negative log-likelihood of ``sequences`` under each keep map (router masked)."""
    nlls = []
    for keep in keep_maps:
        bias = removal_bias(layers, keep)
        with router_logit_bias(layers, bias.__getitem__):
            nlls.append(perplexity_of_ids(model, sequences, batch_size=batch_size)["mean_nll"])
    return nlls


def measure(headroom: dict, args) -> dict:
    """Each run's keep maps with their objectives on unseen calibration text and their fresh-item retention."""
    num_fresh = headroom["meta"]["num_mc"] * len(headroom["meta"]["domains"])
    results = {}
    for key, run in headroom["runs"].items():
        name, zoo_seed, _, _ = key.split("|")
        model, tokenizer = build_zoo_model(name, seed=int(zoo_seed))
        model.eval()
        layers = get_family(model).moe_layers(model)
        text = calibration_ids(tokenizer, args.num_samples, args.seq_len, args.text_seed)
        base = unpack(headroom["base"][f"{name}|{zoo_seed}"]["outcomes"], num_fresh).mean()
        entries = {**run["starts"], "oracle": run["oracle"]}
        keep_maps = [{int(k): v for k, v in entry["keep"].items()} for entry in entries.values()]
        kls = masked_kl(model, layers, keep_maps, text, args.batch_size)
        nlls = masked_nll(model, layers, keep_maps, text, args.batch_size)
        results[key] = {
            "start": run["start"],
            "maps": {label: {"kl": kl, "nll": nll,
                             "retention": float(unpack(entry["outcomes"], num_fresh).mean() / base)}
                     for (label, entry), kl, nll in zip(entries.items(), kls, nlls, strict=True)},
        }
        logger.info("%s: %s", key, {label: (round(m["kl"], 4), round(m["nll"], 4), round(m["retention"], 3))
                                    for label, m in results[key]["maps"].items()})
    return results


def rank_correlation(run: dict, objective: str) -> float:
    """Spearman's correlation of -objective with retention over one run's keep maps (1: ordered as the task)."""
    maps = run["maps"].values()
    return float(spearmanr([-m[objective] for m in maps], [m["retention"] for m in maps]).statistic)


def report(data: dict) -> list[str]:
    meta = data["meta"]
    title = "Objective check: would a calibration-text objective have found the task oracle's keep maps?"
    lines = header(title, meta["commands"], meta["machine"]) + [
        f"Keep maps: each headroom run's starts (the default's and every baseline's) and its oracle "
        f"({meta['headroom']}). Objectives measured on {meta['num_samples']} x {meta['seq_len']} tokens of another "
        f"draw of the calibration generator (seed {meta['text_seed']}, text no criterion saw in the run), router "
        "masked: kl = mean per-token KL(unpruned || pruned), nll = the pruned model's next-token negative "
        "log-likelihood. Lower is better for both; retention = fresh-item accuracy / unpruned (HEADROOM.md's items).",
        "",
        "Columns: rank correlation (Spearman) of -objective with retention over the run's keep maps (1: the "
        "objective orders them as the task does); oracle preferred = the objective is lower on the oracle's map "
        "than on the start it climbed from.",
        "",
        "| run | keep maps | retention: start -> oracle | kl: start -> oracle | nll: start -> oracle "
        "| kl: rank corr. | nll: rank corr. | kl prefers oracle | nll prefers oracle |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, run in data["runs"].items():
        model, zoo_seed, seed, sparsity = key.split("|")
        maps = run["maps"]
        start, oracle = maps[run["start"]], maps["oracle"]
        lines.append(
            f"| {model}, instance {zoo_seed}, calibration seed {seed}, {float(sparsity):.0%} | {len(maps)} "
            f"| {start['retention']:.3f} -> {oracle['retention']:.3f} "
            f"| {start['kl']:.4f} -> {oracle['kl']:.4f} | {start['nll']:.4f} -> {oracle['nll']:.4f} | "
            + " | ".join(f"{rank_correlation(run, o):+.2f}" for o in OBJECTIVES) + " | "
            + " | ".join("yes" if oracle[o] < start[o] else "no" for o in OBJECTIVES) + " |")
    rhos = {o: np.mean([rank_correlation(run, o) for run in data["runs"].values()]) for o in OBJECTIVES}
    lines += ["", "Mean rank correlation over the runs: " + ", ".join(f"{o} {rhos[o]:+.2f}" for o in OBJECTIVES)
              + "."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--headroom", nargs="+", default=[], help="headroom.py results files (to measure)")
    parser.add_argument("--text-seed", type=int, default=100, help="calibration seed of the text measured on")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", required=True)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--report", default=None, help="markdown file to write (default: print)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    if not args.report_only:
        if not args.headroom:
            parser.error("--headroom is needed unless --report-only")
        data = {"meta": {"machine": machine_description(), "headroom": ", ".join(args.headroom),
                         "text_seed": args.text_seed, "num_samples": args.num_samples, "seq_len": args.seq_len,
                         "commands": ["python objective_check.py " + " ".join(argv or sys.argv[1:])]},
                "runs": {}}
        for path in args.headroom:
            data["runs"].update(measure(json.loads(Path(path).read_text()), args))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1), encoding="utf-8")
    data = json.loads(out.read_text())
    text = "\n".join(report(data)) + "\n"
    publish(args.report, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
