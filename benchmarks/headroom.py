"""Headroom: how much more a keep map could keep than the best baseline's, found by a search that sees the task.

FRESH_ITEMS.md finds the default level with the best baseline in the cells where the baselines already keep most of
the unpruned accuracy (olmoe-16e at 50%: 0.938 against 0.939). Issue 12's bar asks the default to be ahead there by
more than the noise. That is only possible if some keep map of that size is ahead. This script looks for one with
an oracle: a greedy search whose objective is the evaluation task itself, which no calibration-based criterion sees.

For each run (zoo instance, calibration seed, sparsity) it
1. rebuilds the default's keep map and every baseline's (global and uniform), exactly as fresh_items.py does;
2. measures each on *search items* (another item sample, ``--search-seed``) by the choice cross-entropy: the mean
   over items of -log softmax over the 4 choices' log-likelihoods, taken at the gold choice (smooth, unlike
   accuracy, so that one move changes it);
3. starts from the keep map with the lowest search loss and climbs: validated_choice's refinement
   (:func:`diep_hub.criteria.refinement.refine_keep_map`: one-expert swaps within a layer and slot moves between
   layers, the run's global selection deciding what is allowed) with the search loss in place of the masked KL;
4. scores the climbed map (the oracle) on the fresh items of fresh_items.py (same sample, same outcomes format),
   where the default and the baselines were scored.

The oracle is optimistic: it fits the items of the same task distribution, and in small domains the search items
and fresh items share prompts (the report counts how many). So "the oracle is not ahead of the best baseline" says
there is no keep map to find; "it is ahead" is an upper bound on what a criterion could gain.

Usage (2-core CPU; one process per model, then the report over their files):
    python benchmarks/headroom.py --models olmoe-16e --out benchmarks/results/headroom/olmoe-16e.json
    python benchmarks/headroom.py --report-only --results benchmarks/results/headroom/*.json \
        --fresh benchmarks/results/fresh_items/*.json --report benchmarks/HEADROOM.md
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
from fresh_items import (
    BASELINES,
    DEFAULT,
    MODELS,
    SELECTIONS,
    add_fresh_run_arguments,
    cell_key,
    item_outcomes,
    pack,
    run_unless_report_only,
    unpack,
)
from item_intervals import crossed_bootstrap
from quality import calibration_ids, score, select
from quality_seeds import parse_method
from report_notes import header, publish, with_this_command

from diep_hub import prune_experts
from diep_hub.criteria.base import get_criterion
from diep_hub.criteria.refinement import refine_keep_map
from diep_hub.criteria.router_bias import removal_bias, router_logit_bias
from diep_hub.families import get_family
from diep_hub.machine import machine_description
from diep_hub.selection import select_experts
from diep_hub.zoo.tasks import ModelScorer, eval_items
from diep_hub.zoo.train import build_zoo_model

logger = logging.getLogger("benchmarks.headroom")


class ChoiceLoss:
    """The search objective in the shape of :class:`~diep_hub.criteria.masked_kl.MaskedKL` that
    ``refine_keep_map`` measures with: ``set_base(keep)``, ``per_sequence(keep_maps)``, ``means(keep_maps)``,
    lower is better, and ``nominal_shares(keep_maps)``, one pass a keep map (no layers to resume from). There are
    no sequences here, so the per-sequence part is None (the climb sets no
    ``min_move_gain_se``, the one reader of it).

    A keep map is applied as the judge applies it, by masking the router (``router_bias``; the refinement's probes
    change one expert of a grouped layer, which surgery would refuse), and scored by the choice cross-entropy on
    ``items``. ``evaluations`` counts the keep maps scored."""

    def __init__(self, model, tokenizer, items: dict) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.layers = get_family(model).moe_layers(model)
        self.pairs = [(ex.prompt, choice) for exs in items.values() for ex in exs for choice in ex.choices]
        self.shape = [(len(ex.choices), ex.gold) for exs in items.values() for ex in exs]
        self.evaluations = 0

    def loss(self, keep: dict[int, list[int]]) -> float:
        bias = removal_bias(self.layers, keep)
        with router_logit_bias(self.layers, lambda position: bias[position]):
            lls = iter(ModelScorer(self.model, self.tokenizer).loglikelihood(self.pairs))
        total = 0.0
        for num_choices, gold in self.shape:
            values = torch.tensor([next(lls) for _ in range(num_choices)], dtype=torch.float64)
            total -= float(torch.log_softmax(values, dim=0)[gold])
        self.evaluations += 1
        return total / len(self.shape)

    def set_base(self, keep: dict[int, list[int]]) -> tuple[float, None]:
        return self.loss(keep), None

    def per_sequence(self, keep_maps: list[dict[int, list[int]]], progress: bool = False,
                     offer_as_base: bool = False) -> list[tuple[float, None]]:
        return [(self.loss(keep), None) for keep in keep_maps]

    def means(self, keep_maps: list[dict[int, list[int]]], progress: bool = False,
              offer_as_base: bool = False) -> list[float]:
        return [mean for mean, _ in self.per_sequence(keep_maps)]

    def nominal_shares(self, keep_maps: list[dict[int, list[int]]]) -> list[float]:
        return [1.0] * len(keep_maps)


def shared_prompts(first: dict, second: dict) -> list[bool]:
    """For each item of ``second`` (domains in order), whether its prompt also appears in ``first`` (same domain)."""
    return [ex.prompt in {e.prompt for e in first[d]} for d in second for ex in second[d]]


def run(args) -> None:
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"meta": {}, "base": {}, "runs": {}}
    fresh = eval_items(args.num_mc, seed=args.item_seed)
    search = eval_items(args.search_mc, seed=args.search_seed)
    meta = {"machine": machine_description(), "num_mc": args.num_mc, "item_seed": args.item_seed,
            "domains": list(fresh), "search_mc": args.search_mc, "search_seed": args.search_seed,
            "rounds": args.rounds, "moves_measured": args.moves_measured, "probe_width": args.probe_width,
            "num_samples": args.num_samples,
            "seq_len": args.seq_len, "shared_with_search": pack(shared_prompts(search, fresh))}
    if data["meta"] and any(data["meta"].get(k, 1 if k == "probe_width" else None) != meta[k] for k in
                            ("num_mc", "item_seed", "search_mc", "search_seed", "rounds", "moves_measured",
                             "probe_width")):
        raise SystemExit(f"{out} was made with other settings; use another --out")
    data["meta"] = with_this_command(data["meta"], meta)
    for name in args.models:
        for zoo_seed in args.zoo_seeds:
            model, tokenizer = build_zoo_model(name, seed=zoo_seed)
            base_key = f"{name}|{zoo_seed}"
            if base_key not in data["base"]:
                data["base"][base_key] = {"outcomes": pack(item_outcomes(model, tokenizer, fresh))}
            objective = ChoiceLoss(model, tokenizer, search)
            for seed in args.seeds:
                input_ids = calibration_ids(tokenizer, args.num_samples, args.seq_len, seed)
                for sparsity in args.sparsities:
                    key = f"{name}|{zoo_seed}|{seed}|{sparsity}"
                    if key not in data["runs"]:
                        data["runs"][key] = climb(model, tokenizer, input_ids, seed, sparsity, objective, fresh,
                                                  args)
                        out.write_text(json.dumps(data, indent=1), encoding="utf-8")


def climb(model, tokenizer, input_ids, seed: int, sparsity: float, objective: ChoiceLoss, fresh: dict,
          args) -> dict:
    """One run: the starting keep maps, their search losses and fresh outcomes, and the climbed map's."""
    starts = {}
    for label in [DEFAULT, *BASELINES]:
        method = parse_method(label)
        if get_criterion(method.criterion).needs_sparsity:  # as fresh_items.py calls each
            result, _ = score(model, method, input_ids, seed=seed, batch_size=args.batch_size, sparsity=sparsity,
                              selection="global")
        else:
            result, _ = score(model, method, input_ids, seed=seed, batch_size=args.batch_size)
        for selection in (("global",) if label == DEFAULT else SELECTIONS):
            keep = select(result.scores, model, sparsity=sparsity, mode=selection)
            pruned = prune_experts(copy.deepcopy(model), keep)
            starts[f"{label}|{selection}"] = {
                "keep": {str(k): v for k, v in sorted(keep.items())}, "scores": result.scores,
                "kept": [len(keep[k]) for k in sorted(keep)], "search_loss": objective.loss(keep),
                "outcomes": pack(item_outcomes(pruned, tokenizer, fresh)),
            }
    start_label = min(starts, key=lambda label: (starts[label]["search_loss"], label))
    start = starts[start_label]
    keep = {int(k): v for k, v in start["keep"].items()}
    layers = get_family(model).moe_layers(model)
    evaluations = objective.evaluations
    climbed, moves, history, *_ = refine_keep_map(
        model, layers, keep, start["scores"],
        lambda scores, mode=None: select_experts(scores, model, sparsity=sparsity, mode=mode or "global"),
        input_ids[:1], args.rounds, args.batch_size, candidates_per_round=args.moves_measured, kl=objective,
        probe_width=args.probe_width)
    pruned = prune_experts(copy.deepcopy(model), climbed)
    logger.info("%s: start %s, search loss %.4f -> %.4f in %d move(s)", seed, start_label, history[0], history[-1],
                len(moves))
    return {
        "starts": {label: {k: v for k, v in entry.items() if k != "scores"} for label, entry in starts.items()},
        "start": start_label,
        "oracle": {"keep": {str(k): v for k, v in sorted(climbed.items())},
                   "kept": [len(climbed[k]) for k in sorted(climbed)], "moves": moves, "search_loss": history,
                   "evaluations": objective.evaluations - evaluations,
                   "outcomes": pack(item_outcomes(pruned, tokenizer, fresh))},
    }


# ----------------------------------------------------------------------------------------------- analysis


def fresh_check(data: dict, fresh_paths: list[str]) -> tuple[int, int]:
    """(equal, compared): starting keep maps whose fresh outcomes equal fresh_items.py's stored run of the same
    instance, calibration seed, method and selection (the same keep map scored on the same items)."""
    stored = {}
    for path in fresh_paths:
        part = json.loads(Path(path).read_text())
        if (part["meta"]["num_mc"], part["meta"]["item_seed"]) == (data["meta"]["num_mc"], data["meta"]["item_seed"]):
            stored.update(part["cells"])
    equal = compared = 0
    for key, entry in data["runs"].items():
        model, zoo_seed, seed, sparsity = key.split("|")
        for label, start in entry["starts"].items():
            method, selection = label.split("|")
            cell = stored.get(cell_key(model, int(zoo_seed), int(seed), method, selection, float(sparsity)))
            if cell is not None:
                compared += 1
                equal += cell["outcomes"] == start["outcomes"] and cell["kept"] == start["kept"]
    return equal, compared


def rows(data: dict, draws: int, level: float = 0.05, disjoint: bool = False) -> list[dict]:
    """Per model and sparsity, over its runs: fresh retention of the default, of the best baseline (the method and
    selection with the highest mean) and of the oracle, and the oracle's and the default's difference from the best
    baseline with a 95% interval over items (the runs held fixed). ``disjoint``: only the fresh items whose prompt
    no search item has."""
    meta = data["meta"]
    num = meta["num_mc"] * len(meta["domains"])
    columns = np.flatnonzero(unpack(meta["shared_with_search"], num) == 0) if disjoint else np.arange(num)
    domain_of_item = np.repeat(np.arange(len(meta["domains"])), meta["num_mc"])[columns]
    cells: dict[tuple[str, float], list[str]] = {}
    for key in data["runs"]:
        model, _, _, sparsity = key.split("|")
        cells.setdefault((model, float(sparsity)), []).append(key)
    out = []
    for (model, sparsity), keys in sorted(cells.items(), key=lambda c: (MODELS.index(c[0][0]), c[0][1])):
        base = np.stack([unpack(data["base"]["|".join(k.split("|")[:2])]["outcomes"], num) for k in keys])[:, columns]

        def outcomes(label: str, keys=keys) -> np.ndarray:
            entries = [data["runs"][k]["oracle"] if label == "oracle" else data["runs"][k]["starts"][label]
                       for k in keys]
            return np.stack([unpack(entry["outcomes"], num) for entry in entries])[:, columns]

        def retention(values: np.ndarray, base=base) -> float:
            return float(np.mean(values.mean(axis=1) / base.mean(axis=1)))

        labels = list(data["runs"][keys[0]]["starts"])
        baselines = [label for label in labels if not label.startswith(DEFAULT + "|")]
        best = max(baselines, key=lambda label: (retention(outcomes(label)), label))

        def against_best(label: str, best=best, base=base) -> tuple[float, float, float]:
            difference = outcomes(label) - outcomes(best)
            boot = crossed_bootstrap(difference, base, domain_of_item, draws=draws, resample_runs=False)
            mean = float(np.mean(difference.mean(axis=1) / base.mean(axis=1)))
            return mean, float(np.quantile(boot, level / 2)), float(np.quantile(boot, 1 - level / 2))

        oracle = against_best("oracle")
        default = against_best(f"{DEFAULT}|global")
        runs = [data["runs"][k] for k in keys]
        out.append({
            "model": model, "sparsity": sparsity, "runs": len(keys), "best": best,
            "default": retention(outcomes(f"{DEFAULT}|global")), "baseline": retention(outcomes(best)),
            "oracle": retention(outcomes("oracle")), "oracle_vs_best": oracle, "default_vs_best": default,
            "starts": [r["start"] for r in runs], "moves": [len(r["oracle"]["moves"]) for r in runs],
            "search_gain": float(np.mean([r["oracle"]["search_loss"][0] - r["oracle"]["search_loss"][-1]
                                          for r in runs])),
            "kept": [r["oracle"]["kept"] for r in runs],
        })
    return out


def report(data: dict, tables: list[tuple[str, list[dict]]], check: tuple[int, int] | None, draws: int) -> list[str]:
    meta = data["meta"]
    num = meta["num_mc"] * len(meta["domains"])
    title = "Headroom: what a search that sees the task keeps, against the best baseline"
    lines = header(title, meta["commands"], meta["machine"]) + [
        f"Runs: cached zoo instances x calibration seeds ({meta['num_samples']} x {meta['seq_len']} tokens); the "
        f"starting keep maps are the default's ({DEFAULT}, global) and every baseline's (global and uniform), as in "
        "fresh_items.py.  ",
        f"Oracle: from the start with the lowest choice cross-entropy on the search items ({meta['search_mc']} per "
        f"domain, item seed {meta['search_seed']}), up to {meta['rounds']} rounds of validated_choice's refinement "
        f"moves (probe width {meta.get('probe_width', 1)}, {meta['moves_measured']} moves measured a round) that "
        "lower it.  ",
        f"Scored on the fresh items of FRESH_ITEMS.md ({meta['num_mc']} per domain, item seed {meta['item_seed']}); "
        f"{int(unpack(meta['shared_with_search'], num).sum())} of those {num} items share their prompt with a "
        "search item (small domains repeat), which favours the oracle: the second table leaves them out.",
        "",
        f"Intervals: 95%, bootstrap over the fresh items within each domain ({draws} draws), the runs held fixed: "
        "the question is whether a better keep map exists for these instances, not for other instances.",
        "",
    ]
    if check is not None:
        lines += [f"Check: {check[0]} of {check[1]} starting keep maps give the same kept counts and the same "
                  "fresh-item outcomes as the stored fresh_items.py run.", ""]
    for title, table in tables:
        lines += [f"## {title}", "", "| model | sparsity | runs | default | best baseline | oracle "
                  "| oracle - best baseline [95%] | default - best baseline [95%] | oracle moves | started from |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_row(r) for r in table] + [""]
    return lines


def _row(r: dict) -> str:
    o, d = r["oracle_vs_best"], r["default_vs_best"]
    starts = ", ".join(f"{label.replace('|', ' ')} x{r['starts'].count(label)}" for label in dict.fromkeys(r["starts"]))
    return (f"| {r['model']} | {r['sparsity']:.0%} | {r['runs']} | {r['default']:.3f} | {r['baseline']:.3f} "
            f"({r['best'].replace('|', ', ')}) | {r['oracle']:.3f} | {o[0]:+.4f} [{o[1]:+.4f}, {o[2]:+.4f}] "
            f"| {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] | {', '.join(map(str, r['moves']))} | {starts} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["olmoe-16e"])
    parser.add_argument("--zoo-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5])
    parser.add_argument("--search-mc", type=int, default=200, help="search items per domain")
    parser.add_argument("--search-seed", type=int, default=9000, help="seed of the search items")
    parser.add_argument("--rounds", type=int, default=16, help="most refinement rounds of the oracle")
    parser.add_argument("--moves-measured", type=int, default=3, help="estimated-best moves measured a round")
    parser.add_argument("--probe-width", type=int, default=1,
                        help="experts a layer probed each round (validated_choice's probe_width; 0: all)")
    add_fresh_run_arguments(parser, Path(__file__).parent / "results" / "headroom" / "all.json")
    parser.add_argument("--fresh", nargs="*", default=None, help="fresh_items.py files to check the starts against")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run_unless_report_only(parser, args, run)
    data = {"meta": None, "base": {}, "runs": {}}
    for path in args.results or [args.out]:
        part = json.loads(Path(path).read_text())
        settings = ("num_mc", "item_seed", "search_mc", "search_seed", "rounds", "moves_measured", "probe_width")
        if data["meta"] and any(data["meta"].get(k, 1) != part["meta"].get(k, 1) for k in settings):
            raise SystemExit(f"{path} was made with other items or search settings than the files before it")
        commands = (data["meta"] or {}).get("commands", [])
        data["meta"] = {**part["meta"], "commands": commands + [c for c in part["meta"]["commands"]
                                                                  if c not in commands]}
        data["base"].update(part["base"])
        data["runs"].update(part["runs"])
    check = None if args.fresh is None else fresh_check(data, args.fresh)
    tables = [("All fresh items", rows(data, args.draws)),
              ("Fresh items whose prompt no search item has", rows(data, args.draws, disjoint=True))]
    text = "\n".join(report(data, tables, check, args.draws)) + "\n"
    publish(args.report, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
