"""Which held-out signal should validated_choice judge by: KL to the unpruned model, or next-token CE?

For each model, sparsity, selection and calibration seed it scores the three default candidates on the fit share of
the calibration tokens (as validated_choice does), measures both signals on the held-out share with the keep map
masked into the router, and evaluates each pruned model on the zoo's multiple-choice items. The summary says how
often the two signals pick the same candidate and what retention each pick keeps, next to the best candidate's.

Usage (2-core CPU, about 8 minutes for the two tuning models at two sparsities):
    python benchmarks/choice_judge.py --models olmoe-16e mixtral-8e --sparsities 0.5 0.75 \
        --out benchmarks/results/choice_judge.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
from pathlib import Path

import torch
from quality import METHODS, calibration_ids, score, select
from quality_seeds import EVAL

from diep_hub import prune_experts
from diep_hub.criteria.choice import log_probabilities, masked_kl, split_calibration
from diep_hub.criteria.router_bias import removal_bias, router_logit_bias
from diep_hub.families import get_family
from diep_hub.zoo.tasks import evaluate_zoo
from diep_hub.zoo.train import build_zoo_model

logger = logging.getLogger("benchmarks.choice_judge")
CANDIDATES = ("reap", "frequency", "soft_frequency")


def masked_ce(model, layers, keep, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy on ``ids`` with the keep map masked into the routers."""
    biases = removal_bias(layers, keep)
    with torch.no_grad(), router_logit_bias(layers, lambda p: biases[p]):
        log_probs = log_probabilities(model(input_ids=ids).logits)[:, :-1]
    return float(-log_probs.gather(-1, ids[:, 1:, None]).mean())


def run(args) -> list[dict]:
    rows = []
    for name in args.models:
        model, tokenizer = build_zoo_model(name, seed=0)
        model.eval()
        base = evaluate_zoo(model, tokenizer, **EVAL)["macro"]["mc_acc"]
        layers = get_family(model).moe_layers(model)
        for sparsity in args.sparsities:
            for mode in ("global", "uniform"):
                for seed in args.seeds:
                    fit, held_out = split_calibration(calibration_ids(tokenizer, 128, 128, seed), 0.25)
                    row = {}
                    for candidate in CANDIDATES:
                        scores = score(model, METHODS[candidate], fit, seed=seed, batch_size=16)[0].scores
                        keep = select(scores, model, sparsity=sparsity, mode=mode)
                        pruned = prune_experts(copy.deepcopy(model), keep)
                        row[candidate] = {
                            "kl": masked_kl(model, layers, [keep], held_out, 16)[0],
                            "ce": masked_ce(model, layers, keep, held_out),
                            "retention": evaluate_zoo(pruned, tokenizer, **EVAL)["macro"]["mc_acc"] / base,
                        }
                    rows.append({"model": name, "sparsity": sparsity, "selection": mode, "seed": seed, "row": row})
                    logger.info("%s %s %s seed %d: %s", name, sparsity, mode, seed, row)
    return rows


def summary(rows: list[dict]) -> str:
    picks = {"kl": [], "ce": [], "best": []}
    same = 0
    for entry in rows:
        row = entry["row"]
        by_kl = min(row, key=lambda c: row[c]["kl"])
        by_ce = min(row, key=lambda c: row[c]["ce"])
        same += by_kl == by_ce
        picks["kl"].append(row[by_kl]["retention"])
        picks["ce"].append(row[by_ce]["retention"])
        picks["best"].append(max(v["retention"] for v in row.values()))
    mean = {k: statistics.fmean(v) for k, v in picks.items()}
    return (f"{len(rows)} cases: KL and CE pick the same candidate in {same}; mean retention of the KL pick "
            f"{mean['kl']:.3f}, of the CE pick {mean['ce']:.3f}, of the best candidate {mean['best']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["olmoe-16e", "mixtral-8e"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="write the per-case rows here (JSON)")
    parser.add_argument("--summary-only", action="store_true", help="summarise --out without running")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.summary_only:
        rows = json.loads(Path(args.out).read_text(encoding="utf-8"))
    else:
        rows = run(args)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
