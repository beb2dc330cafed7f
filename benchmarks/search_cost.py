"""Search cost of every scoring criterion: wall time and peak memory side by side, and the scaling in N.

Part 1 scores one random-weight Mixtral-type MoE (hidden 256, 8 experts of intermediate 512, top-2, 4 layers,
~52 MB of float32 weights) with every registered criterion on the same calibration tokens.
Part 2 runs DiEP (both search modes), NAEE, the default (validated_choice), the removal-aware search and REAP on
MoEs with 8, 64 and 256 experts per layer (same hidden size and expert size, so only N changes), at 50% sparsity:
NAEE refuses where C(N, N/2) exceeds its combination limit.

Each measurement runs in a FRESH subprocess (one thread), so that memory freed by an earlier run and kept by
the allocator cannot hide a later peak. Peak memory on CPU is the live malloc bytes (glibc ``mallinfo2``)
sampled every millisecond while the criterion runs, minus the same just before it (model built, calibration
tokens made, one warm-up forward done).
"One batch of activations" (A) is measured the same way for one plain forward + backward of one calibration
batch (gradients flowing to the activations, none to the weights): the irreducible cost of any gradient step.
DiEP's target (issue 3): model weights W + extra <= 1.2 W + A, i.e. extra <= 0.2 W + A.

Run: ``python benchmarks/search_cost.py`` (about 4 minutes on 2 shared CPU cores); ``--write`` also rewrites
benchmarks/SEARCH_COST.md with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from report_notes import write_keeping_notes

from diep_hub.machine import machine_description
from diep_hub.memory import PeakMemory

HERE = Path(__file__).resolve().parent


def zoo_ratios() -> str:
    """The default's time over REAP's on the zoo models at 128 x 128 calibration tokens, as the range of the
    per-model medians of results/zoo_cost.json (what ZOO_COST.md shows), quoted in the reading of section 1."""
    import statistics

    from zoo_cost import default_over_reap, model_rows

    data = json.loads((HERE / "results" / "zoo_cost.json").read_text(encoding="utf-8"))
    medians = [statistics.median(default_over_reap(model_rows(data, model))) for model in data["meta"]["models"]]
    return f"{min(medians):.1f}-{max(medians):.1f}x"

# the default before refine_budget (benchmarks/BUDGET.md): the ninth run of CHOICE.md's, with no bound on passes
PREVIOUS_DEFAULT = "validated_choice (refine_budget=0)"
CRITERIA = ["validated_choice", "diep", "diep_removal", "reap", "frequency", "soft_frequency", "naee", "random"]


# ------------------------------------------------------------------------------------------------------------
# Worker (runs in a subprocess)
def _model(num_experts: int, intermediate: int, layers: int, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=num_experts,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)  # routers with real preferences
    return model


class _Peak(PeakMemory):
    """Peak live malloc bytes during a block, sampled every millisecond (``diep_hub.memory.PeakMemory``)."""

    def __init__(self):
        super().__init__(interval=0.001)

    @property
    def extra(self) -> int:
        return self.heap_increase


def worker(spec: dict) -> dict:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    import diep_hub  # noqa: F401 - registers families
    from diep_hub.criteria.base import ScoringContext, available_criteria, get_criterion
    from diep_hub.families import get_family
    from diep_hub.selection import select_experts

    assert spec["criterion"] in available_criteria() + ["activations"], spec
    model = _model(spec["num_experts"], spec["intermediate"], spec["layers"])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (spec["num_samples"], spec["seq_len"]), generator=generator)
    batch = ids[: spec["batch_size"]]
    with torch.no_grad():
        model(batch)  # warm-up: allocator, kernels, lazy imports
    out = {**spec, "weight_bytes": weight_bytes}
    if spec["criterion"] == "activations":
        for p in model.parameters():
            p.requires_grad_(False)
        handle = model.get_input_embeddings().register_forward_hook(lambda _m, _i, o: o.requires_grad_(True))
        started = time.perf_counter()
        with _Peak() as peak:
            logits = model(batch).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
            )
            loss.backward()
            del logits, loss
        handle.remove()
        return out | {"seconds": time.perf_counter() - started, "extra_bytes": peak.extra}
    family = get_family(model)
    layers = family.moe_layers(model)
    keep = spec["num_experts"] // 2
    options = {"progress": False, **spec.get("options", {})}
    context = ScoringContext(
        model=model,
        family=family,
        layers=layers,
        input_ids=ids,
        batch_size=spec["batch_size"],
        seed=0,
        num_to_keep={layer.index: keep for layer in layers},
        sparsity=0.5,
        options=options,
        # global selection at 50%, as DiEPPruner would give it (validated_choice compares keep maps with it)
        select=lambda scores, mode=None: select_experts(scores, model, sparsity=0.5, mode=mode or "global"),
    )
    criterion = get_criterion(spec["criterion"])()
    started = time.perf_counter()
    try:
        with _Peak() as peak:
            result = criterion.score(context)
    except Exception as exc:  # noqa: BLE001 - a refusal is a result here
        return out | {"refused": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - started}
    out |= {"seconds": time.perf_counter() - started, "extra_bytes": peak.extra}
    if "refinements" in result.details:  # validated_choice: where its time went
        out |= {"forward_passes": result.details["forward_passes"],
                "refinement_moves": {label: len(r["moves"]) for label, r in result.details["refinements"].items()},
                "refine_passes": sum(r.get("passes", 0.0) for r in result.details["refinements"].values()),
                "refine_budget_passes": result.details.get("refine_budget_passes")}
    return out


# ------------------------------------------------------------------------------------------------------------
# Driver
def run(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed for {spec}:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    print(f"  {spec['criterion']:<15} N={spec['num_experts']:<4} {result.get('seconds', 0):7.2f} s", file=sys.stderr)
    return result


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help="rewrite benchmarks/SEARCH_COST.md")
    parser.add_argument("--epochs", type=int, default=2, help="DiEP epochs (paper: 10; cost is linear in it)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    started = time.perf_counter()
    calib = dict(num_samples=32, seq_len=128, batch_size=8)
    base = dict(num_experts=8, intermediate=512, layers=4, **calib)
    print("part 1: every criterion on one model", file=sys.stderr)
    activations = run(base | {"criterion": "activations"})
    part1 = []
    for name in CRITERIA:
        options = {"epochs": args.epochs} if name == "diep" else {}
        part1.append(run(base | {"criterion": name, "options": options}))
    # the default with no bound on its refinement's passes (the default before refine_budget), and without
    # refinement: what the refinements cost
    part1.append(run(base | {"criterion": "validated_choice", "options": {"refine_budget": 0},
                             "label": PREVIOUS_DEFAULT}))
    part1.append(run(base | {"criterion": "validated_choice", "options": {"refine_rounds": 0},
                             "label": "validated_choice (refine_rounds=0)"}))

    print("part 2: scaling in the number of experts", file=sys.stderr)
    scale_calib = dict(num_samples=32, seq_len=64, batch_size=8)
    part2 = []
    for n in (8, 64, 256):
        spec = dict(num_experts=n, intermediate=128, layers=2, **scale_calib)
        act = run(spec | {"criterion": "activations"})
        rows = {"N": n, "activations": act}
        for mode in ("gated", "dense"):
            rows[mode] = run(spec | {"criterion": "diep", "options": {"epochs": args.epochs, "mode": mode}})
        rows["naee"] = run(spec | {"criterion": "naee"})
        # the default criterion and the removal-aware search at their default settings, against REAP on the same
        # model and tokens
        rows["choice"] = run(spec | {"criterion": "validated_choice"})
        rows["choice_previous"] = run(spec | {"criterion": "validated_choice", "label": PREVIOUS_DEFAULT,
                                              "options": {"refine_budget": 0}})
        rows["removal"] = run(spec | {"criterion": "diep_removal"})
        rows["reap"] = run(spec | {"criterion": "reap"})
        part2.append(rows)
    total = time.perf_counter() - started
    report = render(part1, activations, part2, args.epochs, total)
    print(report)
    if args.write:
        write_keeping_notes(HERE / "SEARCH_COST.md", report)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "search_cost.json").write_text(
            json.dumps({"part1": part1, "activations": activations, "part2": part2}, indent=2) + "\n"
        )


def render(part1, activations, part2, epochs, total) -> str:
    w = part1[0]["weight_bytes"]
    a = activations["extra_bytes"]
    lines = [
        "# Search cost of the scoring criteria",
        "",
        "Command: `python benchmarks/search_cost.py --write` "
        f"(whole run {total:.0f} s; each measurement in a fresh single-threaded subprocess).",
        f"Machine: {machine_description()}, Python {platform.python_version()}; a shared VM (timings are indicative, "
        "not tight).",
        "",
        "Peak memory = live malloc bytes (glibc mallinfo2; torch allocates CPU tensors through malloc) sampled every "
        "1 ms during scoring, minus the same just before it (model built, tokens made, one warm-up forward); unlike "
        "RSS it does not count memory the allocator keeps after frees, so it repeats from run to run. "
        "A = the same measure for one plain forward + backward of one "
        "calibration batch. DiEP target: W + extra <= 1.2 W + A.",
        "",
        "## 1. Every criterion on one model",
        "",
        f"Random-weight Mixtral-type MoE: hidden 256, 4 layers, 8 experts (intermediate 512) top-2, vocab 1024; "
        f"weights W = {mb(w)} MB (float32). Calibration: {part1[0]['num_samples']} x {part1[0]['seq_len']} tokens, "
        f"batch {part1[0]['batch_size']}. DiEP: {epochs} epochs (paper 10; time is linear in epochs), default "
        f"search options. NAEE keeps 4 of 8 per layer (C(8,4) = 70 subsets). A = {mb(a)} MB.",
        "",
        "| criterion | wall time (s) | peak extra memory (MB) | extra / W |",
        "|---|---|---|---|",
    ]
    for row in part1:
        label = row.get("label", row["criterion"])
        if "refused" in row:
            lines.append(f"| {label} | refused | - | {row['refused']} |")
            continue
        lines.append(f"| {label} | {row['seconds']:.2f} | {mb(row['extra_bytes'])} | {row['extra_bytes'] / w:.2f} |")
    diep = next(r for r in part1 if r["criterion"] == "diep")
    ok = w + diep["extra_bytes"] <= 1.2 * w + a
    lines += [
        "",
        f"DiEP peak = W + extra = {mb(w + diep['extra_bytes'])} MB vs target 1.2 W + A = {mb(int(1.2 * w + a))} MB: "
        f"**{'met' if ok else 'NOT met'}** (ratio {(w + diep['extra_bytes']) / (1.2 * w + a):.2f}). "
        "DiEP keeps no second model copy: its extra memory is one batch of activations and logits for the "
        "backward pass, the cached reference hidden states (num_samples x seq_len x hidden, "
        f"{mb(diep['num_samples'] * diep['seq_len'] * 256 * 4)} MB here; 2.1 GB in bf16 for Mixtral 8x7B at "
        "128 x 2048, about 2% of its weights), and alpha/beta with their Adam state (negligible).",
        "",
        "## 2. Scaling with the number of experts per layer",
        "",
        "Mixtral-type MoEs with hidden 256, 2 layers, top-2 and the same expert size (intermediate 128), so that "
        "only the number of experts N changes (weights grow with N, per-token routed compute does not); "
        f"32 x 64 calibration tokens, batch 8; DiEP {epochs} epochs; 50% sparsity (NAEE keeps N/2 per layer, "
        "limit 10,000 subsets). Target column: W + extra <= 1.2 W + A for the gated (default) search.",
        "",
        "| N experts | W (MB) | A (MB) | DiEP gated: s / extra MB | target | DiEP dense: s / extra MB | NAEE |",
        "|---|---|---|---|---|---|---|",
    ]
    for rows in part2:
        cells = []
        for mode in ("gated", "dense"):
            r = rows[mode]
            cells.append("refused" if "refused" in r else f"{r['seconds']:.2f} s / {mb(r['extra_bytes'])} MB")
        naee = rows["naee"]
        n = rows["N"]
        if "refused" in naee:
            naee_cell = f"refused before any work: C({n}, {n // 2}) = {math.comb(n, n // 2):.1e} subsets > 10,000"
        else:
            naee_cell = f"{naee['seconds']:.2f} s / {mb(naee['extra_bytes'])} MB ({math.comb(n, n // 2)} subsets)"
        wn, an, gated = rows["gated"]["weight_bytes"], rows["activations"]["extra_bytes"], rows["gated"]
        target = "-" if "refused" in gated else f"{(wn + gated['extra_bytes']) / (1.2 * wn + an):.2f} x"
        lines.append(f"| {rows['N']} | {mb(wn)} | {mb(an)} | {cells[0]} | {target} | {cells[1]} | {naee_cell} |")
    lines += [
        "",
        "## 3. The default (validated_choice) and the removal-aware search against REAP (default settings, 50%)",
        "",
        "Same models and calibration tokens as section 2. REAP is one calibration pass. validated_choice runs REAP, "
        "frequency and soft frequency on three quarters of the tokens, judges their keep maps (global selection) "
        "by masked forwards on the last quarter and refines the winner's keep map (up to 8 rounds of masked "
        "forwards over 16 sequences, each layer's 4 weakest kept and 4 strongest removed experts probed, within "
        "`refine_budget`: 16 passes over the calibration set, 32 over the refine sequences here). The "
        "removal-aware search is a soft-frequency pass (its start), a "
        "reference pass and its epochs of forward + backward with gates on the routers (top-k experts a token, "
        "like the gated search). Target (issue 12): at most 10x REAP's time, peak within 1.2 W + A.",
        "",
        "| N experts | REAP: s / extra MB | criterion | s / extra MB | time / REAP | peak / (1.2 W + A) |",
        "|---|---|---|---|---|---|",
    ]
    for rows in part2:
        reap = rows["reap"]
        for key, name in (("choice", "validated_choice"), ("choice_previous", PREVIOUS_DEFAULT),
                          ("removal", "diep_removal")):
            row = rows[key]
            wn, an = row["weight_bytes"], rows["activations"]["extra_bytes"]
            lines.append(
                f"| {rows['N']} | {reap['seconds']:.2f} s / {mb(reap['extra_bytes'])} MB | {name} | "
                f"{row['seconds']:.2f} s / {mb(row['extra_bytes'])} MB | {row['seconds'] / reap['seconds']:.1f} x | "
                f"{(wn + row['extra_bytes']) / (1.2 * wn + an):.2f} |"
            )
    work = []
    for rows in part2:
        for key in ("choice", "choice_previous"):
            row = rows[key]
            if "forward_passes" in row:
                moves = sum(row["refinement_moves"].values())
                budget = row.get("refine_budget_passes")
                counted = (f" ({row['refine_passes']:g} as the budget counts them, of {budget:g})"
                           if budget else "")
                work.append(f"{row.get('label', 'the default')} at N = {rows['N']}: {moves} refinement move(s), "
                            f"{row['forward_passes']['refining']:g} passes over the refine sequences{counted}")
    if work:
        lines += ["", "Refinement work (each pass a masked forward of the whole model; resumed ones count the "
                  "share of layers they computed; the budget does not count the unpruned reference pass): "
                  + "; ".join(work) + "."]
    reap1 = next(r for r in part1 if r["criterion"] == "reap")
    choice1 = next(r for r in part1 if r["criterion"] == "validated_choice" and "label" not in r)
    previous1 = next(r for r in part1 if r.get("label") == PREVIOUS_DEFAULT)
    unrefined1 = next(r for r in part1 if r.get("label") == "validated_choice (refine_rounds=0)")
    lines += [
        "",
        f"Reading (the default): in section 1 validated_choice takes {choice1['seconds'] / reap1['seconds']:.1f}x "
        f"REAP's time ({previous1['seconds'] / reap1['seconds']:.1f}x with no bound on the refinement's passes, "
        "`refine_budget=0`, the default before BUDGET.md) and "
        f"{unrefined1['seconds'] / reap1['seconds']:.1f}x without refinement. A refinement measures its moves on a "
        "fixed 16 sequences whatever the calibration size (2 x probe_width x layers + 5 masked forwards in its "
        "first round, fewer after, all within refine_budget = 16 passes over the calibration set), so against "
        "REAP's one pass over the "
        f"{reap1['num_samples']} calibration sequences here it weighs most when the calibration set is small and "
        f"the model has many layers; at 128 x 128 calibration tokens on the zoo models it is {zoo_ratios()} "
        "(ZOO_COST.md). Its extra memory is a batch of log-probabilities (unpruned and masked) on top of a "
        "forward pass, plus what its caches keep within `cache_mb` (the unpruned log-probabilities of its held-out "
        "and refine sequences, and the refine sequences' decoder-layer outputs): no second model copy.",
    ]
    first, last = part2[0], part2[-1]

    def ratio(rows, mode):
        w_n, a_n = rows[mode]["weight_bytes"], rows["activations"]["extra_bytes"]
        return (w_n + rows[mode]["extra_bytes"]) / (1.2 * w_n + a_n)

    met = [str(r["N"]) for r in part2 if ratio(r, "gated") <= 1]
    missed = [str(r["N"]) for r in part2 if ratio(r, "gated") > 1]
    section1_met = "met" if ok else "NOT met"
    refusal = next((r["naee"]["refused"] for r in part2 if "refused" in r["naee"]), "")
    small = first["gated"]
    small_extra = small["extra_bytes"] - 0.2 * small["weight_bytes"] - first["activations"]["extra_bytes"]
    lines += [
        "",
        f"Reading: from N={first['N']} to N={last['N']} the gated search's time goes from "
        f"{first['gated']['seconds']:.2f} s to {last['gated']['seconds']:.2f} s "
        f"(x{last['gated']['seconds'] / first['gated']['seconds']:.1f} for x{last['N'] // first['N']} experts: each "
        "token still runs only its top-2 experts; router logits, alpha/beta and per-expert bookkeeping grow with "
        f"N) and its extra memory goes from {mb(first['gated']['extra_bytes'])} MB to "
        f"{mb(last['gated']['extra_bytes'])} MB; the dense search (paper Eq. 5) runs all N experts on every token, so "
        f"its time ({first['dense']['seconds']:.2f} s -> {last['dense']['seconds']:.2f} s) and activation memory "
        f"({mb(first['dense']['extra_bytes'])} MB -> {mb(last['dense']['extra_bytes'])} MB) grow about linearly "
        f"with N (its peak is {ratio(last, 'dense'):.1f} x the target at N={last['N']})."
        " NAEE's exhaustive search is C(N, N/2) subsets per layer "
        "and refuses before any work from N=64 on, with this message:",
        "",
        f"> {refusal}",
        "",
        f"Memory target for the default (gated) search: {section1_met} in section 1; met at N = "
        f"{', '.join(met) or 'none'}; missed at N = {', '.join(missed) or 'none'}. "
        + (
            f"At N={first['N']} the weights are only {mb(small['weight_bytes'])} MB and the search's fixed overheads "
            f"(allocator arenas, autograd and optimiser bookkeeping: {mb(int(small_extra))} MB above 0.2 W + A) "
            "exceed 0.2 W; they do not grow with the model, so they matter only for toy sizes."
            if missed
            else ""
        ),
        "",
    ]
    return "\n".join(lines)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
