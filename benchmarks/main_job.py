"""The README's main command, timed and scored: what its first paragraph quotes.

Runs ``diep-hub run recipes/tiny.yaml`` (the README's main job) ``--runs`` times from a cold tiny-model cache (a
new, empty ``DIEP_HUB_TINY_CACHE`` each time, so the tiny Mixtral is trained as on a fresh machine) and ``--runs``
times with that model cached, in alternation, one process at a time. Reports the median wall time of each, their
ratio, and the scores the run wrote to ``evaluation.json`` (base and pruned, the same in every run: the job is
deterministic, and the script stops if they differ).

Usage (from the repository root, offline):
    python benchmarks/main_job.py --runs 3 --report benchmarks/MAIN_JOB.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report_notes import header, publish, this_command

from diep_hub.machine import machine_description

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "recipes/tiny.yaml"


def run_once(output: Path, cache: Path) -> tuple[float, dict]:
    """Wall seconds of one main job writing to ``output`` with the tiny model cached in ``cache``, and its
    ``evaluation.json``."""
    env = {**os.environ, "DIEP_HUB_TINY_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "diep_hub.cli", "run", RECIPE, "--output", str(output), "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the main job failed:\n{proc.stderr[-3000:]}")
    return seconds, json.loads((output / "evaluation.json").read_text())


def scores(evaluation: dict) -> dict:
    """Per task (base, pruned) of the primary metric, and the perplexities."""
    tasks = evaluation["comparison"]["tasks"]
    return {
        "tasks": {name: {"metric": t["primary_metric"], **t["metrics"][t["primary_metric"]]}
                  for name, t in tasks.items()},
        "perplexity": evaluation["comparison"]["perplexity"],
    }


def measure(runs: int) -> dict:
    cold, cached, seen = [], [], None
    with tempfile.TemporaryDirectory() as work:
        warm_cache = Path(work) / "warm-cache"
        for i in range(runs):
            seconds, evaluation = run_once(Path(work) / f"cold-{i}", Path(work) / f"cold-cache-{i}")
            cold.append(seconds)
            if i == 0:  # the first cold run's model serves every cached run
                os.rename(Path(work) / "cold-cache-0", warm_cache)
            found = scores(evaluation)
            seconds_cached, evaluation_cached = run_once(Path(work) / f"cached-{i}", warm_cache)
            cached.append(seconds_cached)
            for result in (found, scores(evaluation_cached)):
                if seen is not None and result != seen:
                    raise SystemExit(f"the scores differ between runs: {result} against {seen}")
                seen = result
    return {"cold_seconds": cold, "cached_seconds": cached, "scores": seen}


def report(result: dict, command: str) -> str:
    cold, cached = statistics.median(result["cold_seconds"]), statistics.median(result["cached_seconds"])
    lines = header("The README's main command", [command], machine_description()) + [
        "",
        f"`diep-hub run {RECIPE}`, {len(result['cold_seconds'])} runs from a cold tiny-model cache (the model is "
        f"trained first) and as many with it cached, alternating, one process at a time.",
        "",
        "| | median wall time | runs |",
        "|---|---:|---|",
        f"| cold cache (training included) | {cold:.1f} s | {', '.join(f'{s:.1f}' for s in result['cold_seconds'])} |",
        f"| model cached | {cached:.1f} s | {', '.join(f'{s:.1f}' for s in result['cached_seconds'])} |",
        f"| cached / cold | {cached / cold:.2f} | |",
        "",
        "Scores the job wrote (the same in every run):",
        "",
        "| task | metric | base | pruned (50%, skipping on) | retention |",
        "|---|---|---:|---:|---:|",
    ]
    for name, task in result["scores"]["tasks"].items():
        lines.append(f"| {name} | {task['metric']} | {task['base']:.3f} | {task['pruned']:.3f} "
                     f"| {task['retention']:.3f} |")
    ppl = result["scores"]["perplexity"]
    lines += ["", f"Perplexity on the tiny corpus's test split: {ppl['base']:.3f} (base), {ppl['pruned']:.3f} "
              f"(pruned), {ppl['ratio']:.2f}x."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="cold runs, and as many cached ones")
    parser.add_argument("--report", default=None, help="markdown file to write (default: print)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    result = measure(args.runs)
    publish(args.report, report(result, this_command()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
