"""``python -m diep_hub.zoo.build``: train (or load from the cache) every zoo model and print its evaluation.

Example:
    nice -n 10 python -m diep_hub.zoo.build --seed 0 --markdown benchmarks/ZOO.md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from .train import EXTRA, HELDOUT, ZOO, build_record, build_zoo_model

logger = logging.getLogger(__name__)
NOTES_MARKER = "<!-- notes: hand-written below this line, kept when the tables are regenerated -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diep_hub.zoo.build", description=__doc__.splitlines()[0])
    parser.add_argument(
        "names",
        nargs="*",
        default=list(ZOO),
        help=f"zoo entries (default: {list(ZOO)}; also {list(EXTRA)} and the held-out {list(HELDOUT)})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rebuild", action="store_true", help="train again even if a cached build exists")
    parser.add_argument("--no-eval", action="store_true", help="only build; skip the per-domain evaluation")
    parser.add_argument("--markdown", default=None, help="write the per-domain results table to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = []
    for name in args.names:
        start = time.perf_counter()
        model, tokenizer = build_zoo_model(
            name, seed=args.seed, cache_dir=args.cache_dir, threads=args.threads, rebuild=args.rebuild
        )
        built = time.perf_counter() - start
        if args.no_eval:
            continue
        from .tasks import evaluate_zoo

        start = time.perf_counter()
        result = evaluate_zoo(model, tokenizer)
        record = build_record(name, seed=args.seed, cache_dir=args.cache_dir, threads=args.threads) or {}
        result["train_seconds"] = record.get("train_seconds")  # None for builds cached before it was recorded
        result["train_machine"] = record.get("machine")
        result["build_seconds"] = round(built, 1)
        result["eval_seconds"] = round(time.perf_counter() - start, 1)
        rows.append((name, result))
        print(json.dumps({"model": name, **result}))
    if args.markdown and rows:
        from pathlib import Path

        from .tasks import zoo_markdown

        target = Path(args.markdown)
        notes = ""
        if target.is_file() and NOTES_MARKER in target.read_text(encoding="utf-8"):
            notes = target.read_text(encoding="utf-8").split(NOTES_MARKER, 1)[1]
        command = " ".join(["python -m diep_hub.zoo.build", *(argv if argv is not None else sys.argv[1:])])
        table = zoo_markdown(rows, command=command)
        target.write_text(table + "\n" + NOTES_MARKER + notes, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
