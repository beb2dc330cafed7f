"""Which held-out signal should validated_choice judge by? Six label-free signals against the multiple-choice items.

For each model, sparsity, selection and calibration seed it scores the three default candidates on the fit share of
the calibration tokens (as validated_choice does), measures every signal of :func:`judge_signals` on the held-out
share with the keep map masked into the router, and evaluates each pruned model on the zoo's multiple-choice items.
The summary gives, per signal and sparsity, the mean retention of the candidate the signal picks and how often that
is the best candidate, for each selection's three candidates and for the global and uniform keep maps pooled.

Usage (2-core CPU, about 3 minutes a model, both tuning models in parallel):
    python benchmarks/choice_judge.py --models olmoe-16e --sparsities 0.25 0.5 0.75 --out /tmp/olmoe.json
    python benchmarks/choice_judge.py --models mixtral-8e --sparsities 0.25 0.5 0.75 --out /tmp/mixtral.json
    (the rows of both, concatenated, are benchmarks/results/choice_judge.json; summarise them with
    python benchmarks/choice_judge.py --summary-only --out benchmarks/results/choice_judge.json)
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
from diep_hub.criteria.capture import routing_pass
from diep_hub.criteria.choice import split_calibration
from diep_hub.criteria.masked_kl import log_probabilities
from diep_hub.criteria.router_bias import removal_bias, router_logit_bias
from diep_hub.families import get_family
from diep_hub.zoo.tasks import evaluate_zoo
from diep_hub.zoo.train import build_zoo_model

logger = logging.getLogger("benchmarks.choice_judge")
CANDIDATES = ("reap", "frequency", "soft_frequency")


CONFIDENT = 0.5  # the unpruned model "knows" a position when it gives the true next token at least this


def first_choices(model, layers, ids: torch.Tensor, batch_size: int = 16) -> dict[int, torch.Tensor]:
    """Per MoE layer, the expert the unpruned router ranks first at every position of ``ids`` that has a next token
    (flattened as the per-token KLs are): the groups of ``kl_balanced``, the same for every keep map."""
    chosen = {layer.index: [] for layer in layers}
    routing_pass(model, layers, ids, batch_size,
                 lambda record: chosen[record.layer.index].append(record.top_k_index[:, 0]), progress=False)
    return {index: torch.cat([c.reshape(-1, ids.shape[1])[:, :-1].flatten() for c in parts])
            for index, parts in chosen.items()}


def judge_signals(model, layers, keep, ids: torch.Tensor, first_choice: dict[int, torch.Tensor],
                  batch_size: int = 16) -> dict[str, float]:
    """Label-free signals of how far the masked model is from the unpruned one on ``ids`` (lower is closer).

    - ``kl``: mean per-token KL(unpruned || pruned), validated_choice's judge;
    - ``ce``: mean next-token cross-entropy;
    - ``kl_tail``: mean of the worst tenth of the per-token KLs (a loss concentrated on rare tokens shows here);
    - ``known_ce``: mean cross-entropy of the true next token on the positions the unpruned model knows
      (gives it >= CONFIDENT), i.e. how much of what the model knew survives;
    - ``known_lost``: share of those positions where the true token is no longer the pruned model's argmax;
    - ``kl_balanced``: the per-token KL averaged per expert first (tokens grouped by ``first_choice``, the expert
      the unpruned router ranks first in each MoE layer), then over the experts and layers: a token of a rarely
      used expert weighs as much as its expert's share of tokens does not let it in the plain mean.
    """
    biases = removal_bias(layers, keep)
    kls, ces, known_ce, known_lost = [], [], [], []
    with torch.no_grad():
        for batch in torch.split(ids, batch_size):
            reference = log_probabilities(model(input_ids=batch).logits)[:, :-1]
            with router_logit_bias(layers, lambda p: biases[p]):
                pruned = log_probabilities(model(input_ids=batch).logits)[:, :-1]
            target = batch[:, 1:, None]
            kls.append((reference.exp() * (reference - pruned)).sum(-1).flatten())
            true_pruned = pruned.gather(-1, target)[..., 0]
            ces.append(-true_pruned.flatten())
            known = reference.gather(-1, target)[..., 0].exp() >= CONFIDENT
            known_ce.append(-true_pruned[known])
            known_lost.append((pruned.argmax(-1) != target[..., 0])[known].to(torch.float64))
    kl = torch.cat(kls)
    tail = torch.topk(kl, max(1, kl.numel() // 10)).values
    per_layer = [statistics.fmean(float(kl[chosen == e].mean()) for e in torch.unique(chosen))
                 for chosen in first_choice.values()]
    return {"kl": float(kl.mean()), "ce": float(torch.cat(ces).mean()), "kl_tail": float(tail.mean()),
            "known_ce": float(torch.cat(known_ce).mean()), "known_lost": float(torch.cat(known_lost).mean()),
            "kl_balanced": statistics.fmean(per_layer)}


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
                    row, first_choice = {}, first_choices(model, layers, held_out)
                    for candidate in CANDIDATES:
                        scores = score(model, METHODS[candidate], fit, seed=seed, batch_size=16)[0].scores
                        keep = select(scores, model, sparsity=sparsity, mode=mode)
                        pruned = prune_experts(copy.deepcopy(model), keep)
                        row[candidate] = {
                            **judge_signals(model, layers, keep, held_out, first_choice),
                            "retention": evaluate_zoo(pruned, tokenizer, **EVAL)["macro"]["mc_acc"] / base,
                        }
                    rows.append({"model": name, "sparsity": sparsity, "selection": mode, "seed": seed, "row": row})
                    logger.info("%s %s %s seed %d: %s", name, sparsity, mode, seed, row)
    return rows


SIGNALS = ("kl", "ce", "kl_tail", "known_ce", "known_lost", "kl_balanced")


def _pools(rows: list[dict], joined: bool) -> list[tuple[tuple, dict]]:
    """Candidate pools: one per row, or (joined) the global and uniform rows of one cell pooled under global."""
    if not joined:
        return [((e["model"], e["sparsity"], e["selection"], e["seed"]), e["row"]) for e in rows]
    pools: dict[tuple, dict] = {}
    for e in rows:
        key = (e["model"], e["sparsity"], "global+uniform", e["seed"])
        pools.setdefault(key, {}).update({f"{c} ({e['selection']})": v for c, v in e["row"].items()})
    return list(pools.items())


def summary(rows: list[dict]) -> str:
    """Per signal: mean retention of the candidate it picks, and how often it picks the best one, by sparsity."""
    lines = []
    for joined in (False, True):
        pools = _pools(rows, joined)
        sparsities = sorted({key[1] for key, _ in pools})
        title = "global and uniform keep maps pooled" if joined else "each selection's three candidates"
        lines += [f"\n{title} ({len(pools)} pools): mean retention of the pick (picks of the best)", "",
                  "| signal | " + " | ".join(f"{s:.0%}" for s in sparsities) + " | all |",
                  "|---|" + "---|" * (len(sparsities) + 1)]
        for signal in (*SIGNALS, "best"):
            cells = []
            for only in (*sparsities, None):
                chosen, hits = [], 0
                for key, pool in pools:
                    if only is not None and key[1] != only:
                        continue
                    best = max(v["retention"] for v in pool.values())
                    pick = best if signal == "best" else pool[min(pool, key=lambda c: pool[c][signal])]["retention"]
                    chosen.append(pick)
                    hits += pick == best
                cells.append(f"{statistics.fmean(chosen):.3f} ({hits}/{len(chosen)})")
            lines.append(f"| {signal} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
