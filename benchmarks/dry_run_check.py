"""How close the dry run's cost model comes on runs it was not fitted on: merging and router recalibration.

The CPU constants of ``diep_hub.cost_model`` were fitted on three recipe sizes without merging or recalibration
(docs/dry-run.md). This script measures what those two add: it saves a random-weight Mixtral-type checkpoint
(the tiny tokenizer, so the tiny recipe's offline data and tasks serve it), runs ``recipes/tiny.yaml`` on it with
and without ``pruning.merge`` and ``pruning.recalibration``, each ``--repeats`` times under ``/usr/bin/time -v``
(CPU time = user + sys, and maximum RSS; one thread), and prints each run against the dry run's estimate of the
same recipe. The extra time of the edited runs is compared with the estimate's extra in the same process pairs,
so the ratio does not depend on the machine's speed.

Run: ``python benchmarks/dry_run_check.py --write`` (about 6 minutes on 2 CPU cores; ``--write`` adds the table
to docs/dry-run.md between its markers).
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
    parser.add_argument("--write", action="store_true", help=f"put the table into {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    table = run(args)
    print(table)
    if args.write:
        write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
