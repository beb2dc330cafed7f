"""How close the dry run's cost model comes on runs it was not fitted on: merging and router recalibration.

The CPU constants of ``diep_hub.cost_model`` were fitted on three recipe sizes without merging or recalibration
(docs/dry-run.md). This script measures what those two add: it saves a random-weight Mixtral-type checkpoint
(the tiny tokenizer, so the tiny recipe's offline data and tasks serve it), runs ``recipes/tiny.yaml`` on it with
and without ``pruning.merge`` and ``pruning.recalibration``, each ``--repeats`` times under ``/usr/bin/time -v``
(CPU time = user + sys, and maximum RSS; one thread), and prints each run against the dry run's estimate of the
same recipe. The extra time of the edited runs is compared with the estimate's extra in the same process pairs,
so the ratio does not depend on the machine's speed.

A second table measures merging's neuron alignment (one Hungarian assignment a merged expert, after a float64
affinity matmul), the term that dominates merging on wide experts, against its estimate.

A third table runs the plain recipe on the three sizes the constants were fitted on, against the estimate and the
figures recorded when fitting: how far the constants carry to this machine.

Run: ``python benchmarks/dry_run_check.py --write`` (about 12 minutes on 2 CPU cores; ``--write`` puts the tables
into docs/dry-run.md between its markers).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from diep_hub.machine import machine_description

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "dry-run.md"
BEGIN, END = "<!-- dry_run_check: begin -->", "<!-- dry_run_check: end -->"
COMMAND = "python benchmarks/dry_run_check.py --write"
#: (label, the recipe's pruning edits)
VARIANTS = (
    ("plain", {}),
    # the search's own passes, fitted term: how fast this machine runs a counted pass
    ("DiEP search, 16 epochs instead of 4", {"search": {"epochs": 16}}),
    ("merging + recalibration (32 steps)", {"merge": "output_cosine", "recalibration": {"enabled": True}}),
    ("recalibration (128 steps)", {"recalibration": {"enabled": True, "steps": 128}}),
)


def save_checkpoint(folder: Path, *, hidden: int, intermediate: int, layers: int, seed: int = 0) -> Path:
    """A random-weight Mixtral-type MoE (8 experts, top-2) over the tiny tokenizer, saved as a local checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    from diep_hub.tiny_data import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_recipe(path: Path, model: Path, edits: dict) -> Path:
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text(encoding="utf-8"))
    recipe["model"]["id"] = str(model)
    for key, value in edits.items():
        current = recipe["pruning"].get(key)
        recipe["pruning"][key] = {**current, **value} if isinstance(current, dict) else value
    recipe["publish"]["card"]["tags"] = ["moe", "pruning"]
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def measure(recipe: Path, output: Path) -> tuple[float, float]:
    """(CPU seconds, maximum RSS in MiB) of one ``diep-hub run`` of ``recipe`` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "diep_hub.cli", "-q", "run", str(recipe),
               "--output", str(output), "--overwrite"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")

    def field(name: str) -> float:
        return float(re.search(rf"{re.escape(name)}: ([0-9.]+)", done.stderr).group(1))

    cpu = field("User time (seconds)") + field("System time (seconds)")
    return cpu, field("Maximum resident set size (kbytes)") / 1024


def estimate(recipe: Path) -> dict:
    from diep_hub import dry_run
    from diep_hub.pipeline.plan import resolve_plan
    from diep_hub.recipe import load_recipe

    return dry_run.estimate(resolve_plan(load_recipe(recipe)))


def run(args) -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = save_checkpoint(work / "model", hidden=args.hidden, intermediate=args.intermediate, layers=args.layers)
        measured = {}
        for label, edits in VARIANTS:
            recipe = write_recipe(work / f"{len(measured)}.yaml", model, edits)
            est = estimate(recipe)
            runs = [measure(recipe, work / "out") for _ in range(args.repeats)]
            measured[label] = (est, runs)
        plain_est, plain_runs = measured["plain"]
        for label, (est, runs) in measured.items():
            cpu = statistics.mean(r[0] for r in runs)
            rss = statistics.mean(r[1] for r in runs)
            peak = est["peak_bytes_estimate"] / 2**20
            extra = ""
            if label != "plain":
                # run i of the variant against run i of the plain recipe: neighbours' load shifts both alike
                gained = [r[0] - p[0] for r, p in zip(runs, plain_runs)]
                predicted = est["run_seconds_estimate"] - plain_est["run_seconds_estimate"]
                extra = (f"{statistics.mean(gained):.1f} s ({', '.join(f'{g:.1f}' for g in gained)}) | "
                         f"{predicted:.1f} s")
                extra += f" | {statistics.mean(gained) / predicted:.2f}"
            rows.append(f"| {label} | {', '.join(f'{r[0]:.1f}' for r in runs)} | {est['run_seconds_estimate']:.1f} s "
                         f"({100 * (est['run_seconds_estimate'] / cpu - 1):+.0f} %) | {extra or '- | - | -'} | "
                         f"{', '.join(f'{r[1]:.0f}' for r in runs)} | "
                         f"{peak:.0f} MiB ({100 * (peak / rss - 1):+.0f} %) |")
    lines = [
        f"Command: `{COMMAND}`  ",
        f"Machine: {machine_description()}.  ",
        f"Model: random-weight Mixtral type, hidden {args.hidden}, expert intermediate {args.intermediate}, "
        f"{args.layers} layers, 8 experts top-2, the tiny tokenizer; recipes/tiny.yaml otherwise (DiEP, 32 x 64 "
        f"calibration tokens, batch 8, base and pruned evaluation). Each recipe run {args.repeats} times, one "
        "thread, CPU time (user + sys) and maximum RSS from `/usr/bin/time -v`.",
        "",
        "| recipe | CPU s (runs) | estimate (vs mean) | extra over plain, measured (runs) | extra, estimated | "
        "measured / estimated extra | max RSS MiB (runs) | peak estimate (vs mean) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    return "\n".join(lines)


#: the recipe sizes the CPU constants were fitted on (cost_model.CALIBRATION): (label, hidden, intermediate, layers);
#: None = recipes/tiny.yaml's own model, diep-hub/tiny-mixtral
SIZES = (("tiny", None), ("mid", (256, 512, 4)), ("large", (512, 1024, 8)))


def sizes_table(repeats: int) -> str:
    """The plain recipe on the three sizes the constants were fitted on, against the estimate and against what the
    fitting machine recorded (``CALIBRATION``): how far the constants carry to this machine."""
    from diep_hub.cost_model import CALIBRATION

    recorded = {run["name"].split(" ")[0]: run for run in CALIBRATION}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label, shape in SIZES:
            if shape is None:
                recipe = ROOT / "recipes" / "tiny.yaml"
                measure(recipe, work / "out")  # builds and caches the tiny model once: the rows compare cached runs
            else:
                hidden, intermediate, layers = shape
                model = save_checkpoint(work / label, hidden=hidden, intermediate=intermediate, layers=layers)
                recipe = write_recipe(work / f"{label}.yaml", model, {})
            est = estimate(recipe)
            runs = [measure(recipe, work / "out") for _ in range(repeats)]
            cpu, rss = statistics.mean(r[0] for r in runs), statistics.mean(r[1] for r in runs)
            peak = est["peak_bytes_estimate"] / 2**20
            fitted = recorded[label]
            seconds = est["run_seconds_estimate"]
            rows.append(f"| {label} | {est['params_total'] / 1e6:.2f} M | {', '.join(f'{r[0]:.1f}' for r in runs)} | "
                        f"{seconds:.1f} s ({100 * (seconds / cpu - 1):+.0f} %) | "
                        f"{fitted['cpu_seconds']:.1f} s{' (cold, training included)' if label == 'tiny' else ''} | "
                        f"{', '.join(f'{r[1]:.0f}' for r in runs)} | {peak:.0f} MiB ({100 * (peak / rss - 1):+.0f} %) "
                        f"| {fitted['max_rss_bytes'] / 2**20:.0f} MiB |")
    return "\n".join([
        "The fitted sizes: the plain recipe (tiny: recipes/tiny.yaml with its model cached; mid and large: "
        "random-weight Mixtral-type checkpoints of section 2), one thread.",
        "",
        "| size | parameters | CPU s (runs) | estimate (vs mean) | recorded when fitting | max RSS MiB (runs) | "
        "peak estimate (vs mean) | recorded when fitting |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])


def alignment_table(widths: tuple[int, ...], hidden: int) -> str:
    """Merging's neuron alignment, measured against the cost model's term: one random-weight Mixtral-type layer
    (8 experts, 4 removed and merged) per expert width, merged with ``align="weights"`` and with ``align="none"``
    on the same tokens; the difference of CPU time is the alignment of the 4 merges."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    from diep_hub.cost_model import DEVICE_COSTS, CostInputs, cost_model
    from diep_hub.merging import merge_removed_experts

    torch.set_num_threads(1)
    rows = []
    for width in widths:
        config = MixtralConfig(vocab_size=64, hidden_size=hidden, intermediate_size=width, num_hidden_layers=1,
                               num_attention_heads=8, num_key_value_heads=8, num_local_experts=8,
                               num_experts_per_tok=2, max_position_embeddings=128)
        seconds = {}
        for align in ("none", "weights"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config)
            input_ids = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(0))
            start = time.process_time()
            merge_removed_experts(model, {0: [0, 1, 2, 3]}, input_ids, batch_size=4, align=align)
            seconds[align] = time.process_time() - start
            del model
        measured = seconds["weights"] - seconds["none"]
        inputs = CostInputs(**{**dict.fromkeys(CostInputs.__dataclass_fields__, 0),
                               "aligned_merges": 4, "align_width": width, "align_features": 3 * hidden})
        estimated = cost_model(inputs, DEVICE_COSTS["cpu"])["alignment_seconds"]
        rows.append(f"| {width} | {seconds['none']:.2f} | {seconds['weights']:.2f} | {measured:.2f} | "
                    f"{estimated:.2f} | {measured / estimated:.2f} |")
    return "\n".join([
        f"Alignment: one random-weight Mixtral-type layer, hidden {hidden}, 8 experts, 4 merged into the other 4; "
        "CPU seconds of `merge_removed_experts` in this process (one thread).",
        "",
        "| expert width I | align none, s | align weights, s | alignment (the difference), s | estimated, s | "
        "measured / estimated |",
        "|---|---|---|---|---|---|",
        *rows,
    ])


def write(table: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    if BEGIN not in text:
        raise SystemExit(f"{DOC} has no {BEGIN} marker")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--align-widths", nargs="+", type=int, default=[1024, 2048, 4096],
                        help="expert widths of the alignment table")
    parser.add_argument("--align-hidden", type=int, default=1024, help="hidden size of the alignment table")
    parser.add_argument("--write", action="store_true", help=f"put the table into {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    table = "\n\n".join([run(args), alignment_table(tuple(args.align_widths), args.align_hidden),
                           sizes_table(args.repeats)])
    print(table)
    if args.write:
        write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
