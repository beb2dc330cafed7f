"""The ``diep-hub`` command line: thin commands over the library.

Data goes to stdout (JSON with ``--json``), logs and progress bars to stderr. Every failure ends in exactly one
stderr line ``diep-hub <command>: error: <message>`` and exit code 2, decided in :func:`main` only: errors raised on
purpose by the library (:class:`~diep_hub.errors.DiEPError`) and operating-system errors (a missing file, a full
disk) give their message; anything else is a bug, said as such. ``-v`` adds the traceback. A reproduction that ran
and does not match exits with 1; Ctrl-C exits with 130. Log records are prefixed ``LEVEL name:`` on every line,
so they are never mistaken for the error line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import DiEPError

logger = logging.getLogger("diep_hub.cli")

EXIT_OK, EXIT_MISMATCH, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

MAIN_EPILOG = """\
examples:
  diep-hub run recipes/tiny.yaml --output out/tiny          # the whole flow, offline, in about a minute
  diep-hub run recipes/mixtral-8x7b-diep-50.yaml --dry-run  # memory and time estimate, no weights loaded
  diep-hub inspect out/tiny                                  # experts per layer, method, results
  diep-hub reproduce out/tiny                                # re-run the recorded recipe and compare
  diep-hub push out/tiny my-user/tiny-mixtral-diep-50        # publish (needs HF_TOKEN)
  diep-hub env                                               # versions and platform for a bug report

A recipe is a YAML file (see recipes/); `diep-hub run tiny` finds a recipe shipped with the package by name.

exit codes: 0 done; 1 `reproduce` ran and found a difference; 2 an error, said in one line on stderr
(`diep-hub COMMAND: error: ...`; add -v for the traceback); 130 interrupted.
"""

RUN_EPILOG = """\
examples:
  diep-hub run recipes/tiny.yaml --output out/tiny
  diep-hub run recipes/mixtral-8x7b-diep-50.yaml --dry-run --json
  diep-hub run recipes/olmoe-1b-7b-diep-50.yaml --push --repo-id my-user/OLMoE-1B-7B-DiEP-50

The flow: load the model -> evaluate it -> prune (score, select, surgery) -> skipping (if enabled) -> evaluate the
pruned model -> model card -> save (weights, config, remote code, pruning_report.json, evaluation.json,
recipe.yaml, README.md) -> push (if asked). Recipe problems are all reported at once, before anything loads.

recipe sections (unknown keys are errors):
  model:      id, revision, dtype (auto|float32|float16|bfloat16), device_map, trust_remote_code
  pruning:    method (diep|reap|frequency|soft_frequency|naee|random), sparsity (0-1), selection
              (global|uniform), seed, calibration {dataset, config, split, text_field, path, num_samples, seq_len},
              search {mode (auto|gated|dense), lr, epochs, batch_size, lambda, alternation "3:1", ranking},
              floors {min_experts_per_layer, max_layer_sparsity, regroup}
  skipping:   enabled, kernel (linear|rbf), num_samples
  evaluation: enabled, base, tasks, include_path, limit, batch_size, num_fewshot, perplexity, speed, memory
  output:     dir, stock_format
  publish:    repo_id, push, private, create_pr, commit_message, card {license, tags, extra_markdown}
"""

PRUNE_EPILOG = """\
examples:
  diep-hub prune diep-hub/tiny-mixtral --sparsity 0.5 --dataset diep-hub/tiny-text --num-samples 16 \\
      --seq-len 64 --epochs 2 --output out/tiny-pruned
  diep-hub prune mistralai/Mixtral-8x7B-v0.1 --sparsity 0.25 --method reap --dtype bfloat16 \\
      --device-map auto --output out/mixtral-reap-25

Pruning only (no evaluation, no card results): for the whole flow write a recipe and use `diep-hub run`.
"""

EVAL_EPILOG = """\
examples:
  diep-hub eval out/tiny --tasks diep_tiny_arith
  diep-hub eval out/tiny --tasks diep_tiny_arith --base diep-hub/tiny-mixtral --save && diep-hub card out/tiny
  diep-hub eval mistralai/Mixtral-8x7B-v0.1 --tasks mmlu,boolq,openbookqa,rte --dtype bfloat16 --device-map auto
  diep-hub eval out/my-model --tasks my_task --include-path tasks/ --limit 100 --json
"""

ENV_EPILOG = """\
examples:
  diep-hub env            # paste the output into a bug report
  diep-hub env --json
"""

CARD_EPILOG = """\
examples:
  diep-hub card out/tiny                 # rewrite out/tiny/README.md from the report, evaluation and recipe
  diep-hub card out/tiny --stdout        # print the card instead
"""

PUSH_EPILOG = """\
examples:
  diep-hub push out/tiny my-user/tiny-mixtral-diep-50
  diep-hub push out/mixtral my-org/Mixtral-8x7B-DiEP-50 --private --create-pr --message "DiEP 50%"

The token comes from HF_TOKEN or `hf auth login`; it is checked before any upload and never printed.
"""

INSPECT_EPILOG = """\
examples:
  diep-hub inspect out/tiny
  diep-hub inspect my-user/tiny-mixtral-diep-50 --json      # a Hub repo: only metadata files are downloaded
"""

REPRODUCE_EPILOG = """\
examples:
  diep-hub reproduce out/tiny
  diep-hub reproduce my-user/tiny-mixtral-diep-50 --json

Re-runs the recipe.yaml stored in the checkpoint and compares kept experts, weights, expert scores and evaluation
scores with what is recorded. Exit code 0 when everything matches, 1 when something differs, 2 on an error.
"""


# ------------------------------------------------------------------------------------------------- output
def _emit(data: Any, as_json: bool, text: Callable[[Any], str] | None = None) -> None:
    if as_json or text is None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(text(data) + "\n")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _run_text(summary: dict) -> str:
    if summary.get("dry_run"):
        e = summary["estimate"]
        lines = [
            f"dry run: {e['model']} ({e['family']}, {e['dtype']})",
            f"  MoE layers {e['num_moe_layers']}, experts per layer {e['experts_per_layer']}, top-k {e['top_k']}",
            f"  parameters {e['params_total']:,} (experts {e['params_experts']:,}), "
            f"after pruning ~{e['params_after_pruning']:,}",
            f"  experts removed {e['experts_removed']} of {e['experts_total']}",
            f"  weights {_size(e['weight_bytes'])} -> ~{_size(e['weight_bytes_after_pruning'])}",
            f"  search ~{_duration(e['search_seconds_estimate'])}, peak ~{_size(e['search_peak_bytes_estimate'])}",
            f"  ({e['assumptions']})",
            f"  output would go to {summary['output_dir']}; push: {summary['push']}",
        ]
        return "\n".join(lines)
    kept = " ".join(str(r["kept"]) for r in summary["experts"])
    lines = [f"saved {summary['output_dir']} ({summary['method']}, sparsity {summary['sparsity']})",
             f"experts kept per layer: {kept}", f"wall time {summary['wall_seconds']} s"]
    if summary.get("pushed"):
        lines.append(f"pushed: {summary['pushed']['commit_url']}")
    return "\n".join(lines)


def _reproduce_text(result: dict) -> str:
    lines = [f"reproduce {result['source']}: {'MATCH' if result['match'] else 'MISMATCH'}"]
    for name, check in result["checks"].items():
        lines.append(f"  {name}: {'ok' if check['match'] else 'differs'}")
        for d in check.get("differences", [])[:5]:
            lines.append(f"    {d}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    from .runner import run_recipe

    summary = run_recipe(
        args.recipe, dry_run=args.dry_run, push=args.push, output_dir=args.output, repo_id=args.repo_id,
        overwrite=args.overwrite,
    )
    _emit(summary, args.json, _run_text)
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    from .recipe import Recipe
    from .runner import run_recipe

    calibration: dict[str, Any] = {"num_samples": args.num_samples, "seq_len": args.seq_len, "split": args.split,
                                   "text_field": args.text_field}
    if args.data_file:
        calibration.update(path=args.data_file, dataset=None)
    else:
        calibration.update(dataset=args.dataset, config=args.dataset_config)
    given = {"mode": args.search_mode, "lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size}
    search = {k: v for k, v in given.items() if v is not None}  # unset: the search's own defaults
    data = {
        "model": {"id": args.model, "dtype": args.dtype, "device_map": args.device_map,
                  "trust_remote_code": args.trust_remote_code},
        "pruning": {"method": args.method, "sparsity": args.sparsity, "selection": args.selection, "seed": args.seed,
                    "calibration": calibration,
                    "search": search},
        "evaluation": {"enabled": False},
        "output": {"stock_format": args.stock_format},
    }
    recipe = Recipe.from_dict(data, source="command line", base_dir=".")
    summary = run_recipe(recipe, output_dir=args.output, push=False, overwrite=args.overwrite)
    _emit(summary, args.json, _run_text)
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from .inspection import EVAL_FILE, write_json_atomic
    from .model_loading import load_model
    from .recipe import Recipe
    from .runner import evaluate, evaluation_tasks

    if args.save and not (Path(args.model) / "config.json").is_file():
        raise DiEPError(f"--save writes {EVAL_FILE} into a checkpoint folder, and {args.model!r} is not one "
                        "(no config.json); evaluate the folder written by `diep-hub run` or `prune`")
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else []

    def recipe_for(model_id: str) -> Recipe:
        data = {"model": {"id": model_id, "dtype": args.dtype, "device_map": args.device_map,
                          "trust_remote_code": args.trust_remote_code},
                "evaluation": {"tasks": tasks, "include_path": args.include_path, "limit": args.limit,
                               "batch_size": args.batch_size, "num_fewshot": args.num_fewshot, "speed": args.speed,
                               "memory": args.memory}}
        return Recipe.from_dict(data, source="command line", base_dir=".")

    def run_one(model_id: str) -> dict[str, Any]:
        recipe = recipe_for(model_id)
        model, tokenizer = load_model(recipe)
        with tempfile.TemporaryDirectory(prefix="diep-hub-eval-") as tmp:
            names, include = evaluation_tasks(recipe, Path(tmp))  # as `run` does: tiny task files written on the fly
            return evaluate(model, tokenizer, recipe, tasks=names, include_path=include)

    recipes = [recipe_for(args.model)] + ([recipe_for(args.base)] if args.base else [])  # validate both first
    del recipes
    results: dict[str, Any] = {"pruned": run_one(args.model)}
    if args.base:
        from .evaluation import compare

        results["base"] = run_one(args.base)
        results["comparison"] = compare(results["base"], results["pruned"])
    if args.save:
        target = Path(args.model) / EVAL_FILE
        write_json_atomic(target, results)
        logger.info("wrote %s; `diep-hub card %s` puts the results in the model card", target, args.model)
    _emit(results if args.base else results["pruned"], True)
    return EXIT_OK


def cmd_card(args: argparse.Namespace) -> int:
    from .runner import rebuild_card

    card = rebuild_card(args.folder, write=not args.stdout)
    if args.stdout:
        sys.stdout.write(card + "\n")
    else:
        _emit({"card": f"{args.folder}/README.md"}, args.json, lambda d: f"wrote {d['card']}")
    return EXIT_OK


def _recorded_publish_settings(folder: str) -> dict[str, Any]:
    """The ``publish`` section of the recipe saved in a checkpoint folder by `diep-hub run` ({} without one).

    The folder's config, report, evaluation and recipe are all parsed here, before the push: a damaged one is named
    with its line and column rather than failing halfway through the upload.
    """
    from .inspection import read_checkpoint_metadata

    recipe = read_checkpoint_metadata(folder)["recipe"] or {}
    publish = recipe.get("publish") or {}
    return publish if isinstance(publish, dict) else {}


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push

    recorded = _recorded_publish_settings(args.folder)
    private = args.private if args.private is not None else bool(recorded.get("private", False))
    create_pr = args.create_pr if args.create_pr is not None else bool(recorded.get("create_pr", False))
    message = args.message if args.message is not None else recorded.get("commit_message")
    info = push(args.folder, args.repo_id, private=private, create_pr=create_pr, commit_message=message,
                allow_pickle=args.allow_pickle)
    data = {"repo_id": args.repo_id, "commit_url": getattr(info, "commit_url", str(info)),
            "pr_url": getattr(info, "pr_url", None)}
    data["pull_request_opened"] = bool(create_pr and data["pr_url"])

    def text(d: dict) -> str:
        if create_pr and not d["pr_url"]:
            return f"no pull request opened on {d['repo_id']}: nothing changed compared with main ({d['commit_url']})"
        return f"pushed {d['repo_id']}: {d['pr_url'] or d['commit_url']}"

    _emit(data, args.json, text)
    return EXIT_OK


def _env_text(report: dict) -> str:
    lines = [f"platform:  {report['platform']}", f"machine:   {report['machine']}", "packages:"]
    lines += [f"  {name}: {found or 'not installed'}" for name, found in report["packages"].items()]
    hub = report["hub"]
    lines += ["hub:", f"  endpoint: {hub['endpoint']}", f"  offline: {'yes' if hub['offline'] else 'no'}",
              f"  cache: {hub['cache']}", f"  token configured: {'yes' if hub['token_configured'] else 'no'}"]
    return "\n".join(lines)


def cmd_env(args: argparse.Namespace) -> int:
    from .machine import environment_report

    _emit(environment_report(), args.json, _env_text)
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import format_inspection, inspect_checkpoint

    _emit(inspect_checkpoint(args.target, revision=args.revision), args.json, format_inspection)
    return EXIT_OK


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduction import reproduce

    result = reproduce(args.target, revision=args.revision, evaluate_scores=not args.no_eval)
    _emit(result, args.json, _reproduce_text)
    return EXIT_OK if result["match"] else EXIT_MISMATCH


# ------------------------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _verbosity(p: argparse.ArgumentParser, default: Any) -> None:
    # On the main parser and on every subcommand, so `diep-hub -q run ...` and `diep-hub run ... -q` both work.
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="show the traceback of an error (-vv: also debug logs)")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="only warnings and errors on stderr")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device-map", default=None, help="accelerate device map, e.g. auto or cpu (default: none)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the Hub")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render the docs)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="diep-hub", formatter_class=fmt, epilog=MAIN_EPILOG,
        description="Prune Mixture-of-Experts models with DiEP (arXiv 2509.16105) and publish them on the Hub.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"diep-hub {__version__}")
    _verbosity(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("env", help="versions, platform and Hub settings, for bug reports", formatter_class=fmt,
                       epilog=ENV_EPILOG, description="Print what a bug report needs (never the token itself).")
    _verbosity(p, argparse.SUPPRESS)
    _common(p)
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("run", help="run a recipe: prune, evaluate, card, save, push", epilog=RUN_EPILOG,
                       formatter_class=fmt, description="Run a YAML recipe end to end.")
    _verbosity(p, argparse.SUPPRESS)
    p.add_argument("recipe", help="recipe file (YAML), or the name of a shipped recipe such as 'tiny'")
    p.add_argument("--dry-run", action="store_true", help="estimate memory and time from the config; load no weights")
    p.add_argument("--push", dest="push", action="store_true", default=None,
                   help="push to the Hub (overrides the recipe)")
    p.add_argument("--no-push", dest="push", action="store_false", help="do not push, whatever the recipe says")
    p.add_argument("--output", default=None, help="output folder (overrides output.dir)")
    p.add_argument("--repo-id", default=None, help="Hub repository namespace/name (overrides publish.repo_id)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    _common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("prune", help="prune a model (no evaluation)", epilog=PRUNE_EPILOG, formatter_class=fmt,
                       description="Prune a model from command-line options and save the checkpoint.")
    _verbosity(p, argparse.SUPPRESS)
    p.add_argument("model", help="Hub model id, local folder, or diep-hub/tiny-mixtral")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of routed experts to remove (0-1)")
    p.add_argument("--method", default="diep", help="diep|reap|frequency|soft_frequency|naee|random")
    p.add_argument("--selection", default=None,
                   help="global (non-uniform) or uniform; default: the method's own (global; uniform for naee)")
    p.add_argument("--dataset", default="allenai/c4", help="calibration Hub dataset (or diep-hub/tiny-text)")
    p.add_argument("--dataset-config", default="en", help="dataset configuration name")
    p.add_argument("--data-file", default=None, help="local calibration file (json/jsonl/parquet/txt) instead")
    p.add_argument("--split", default="train")
    p.add_argument("--text-field", default="text")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--search-mode", default=None,
                   help="auto (default: gated where top-k weights are renormalised, else dense), gated (keeps the "
                        "router) or dense (the paper's Eq. 5: all experts mixed)")
    p.add_argument("--lr", type=float, default=None, help="search learning rate (default 5e-3)")
    p.add_argument("--epochs", type=int, default=None, help="search epochs (default 10, as in the paper)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stock-format", action="store_true", help="save as the stock architecture (uniform counts)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    _model_args(p)
    _common(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="evaluate a model or a pruned checkpoint", epilog=EVAL_EPILOG,
                       formatter_class=fmt, description="Evaluate with lm-eval tasks, speed and memory probes.")
    _verbosity(p, argparse.SUPPRESS)
    p.add_argument("model", help="checkpoint folder, Hub model id, or diep-hub/tiny-mixtral")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="folder of local lm-eval task YAML files")
    p.add_argument("--limit", type=float, default=None, help="examples per task (>=1) or a fraction (0-1]")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--speed", action="store_true", help="measure prefill and decode tokens/s")
    p.add_argument("--memory", action="store_true", help="measure parameter bytes and peak memory")
    p.add_argument("--base", default=None,
                   help="also evaluate this base model (Hub id or folder) and report retention = pruned / base")
    p.add_argument("--save", action="store_true",
                   help="write the results into MODEL/evaluation.json, where `diep-hub card` reads them")
    _model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("card", help="(re)write the model card of a checkpoint folder", epilog=CARD_EPILOG,
                       formatter_class=fmt, description="Build README.md from the report, evaluation and recipe.")
    _verbosity(p, argparse.SUPPRESS)
    p.add_argument("folder", help="checkpoint folder written by `diep-hub run` or `prune`")
    p.add_argument("--stdout", action="store_true", help="print the card instead of writing README.md")
    _common(p)
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("push", help="push a checkpoint folder to the Hub", epilog=PUSH_EPILOG, formatter_class=fmt,
                       description="Upload a checkpoint folder to a Hub model repository in one commit.")
    _verbosity(p, argparse.SUPPRESS)
    p.add_argument("folder", help="checkpoint folder")
    p.add_argument("repo_id", help="namespace/name")
    p.add_argument("--private", action=argparse.BooleanOptionalAction, default=None,
                   help="create the repository as private (default: the folder recipe's publish.private, else no)")
    p.add_argument("--create-pr", action=argparse.BooleanOptionalAction, default=None,
                   help="open a pull request instead of committing to main (default: publish.create_pr, else no)")
    p.add_argument("--message", default=None, help="commit message (default: publish.commit_message, else generated)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also upload pickle weights (*.bin, *.pt, *.pth, *.pkl); refused by default: loading a "
                   "pickle can run arbitrary code")
    _common(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("inspect", help="show experts per layer, method and results", epilog=INSPECT_EPILOG,
                       formatter_class=fmt, description="Describe a pruned checkpoint (folder or Hub repo).")
    _verbosity(p, argparse.SUPPRESS)
    p.add_argument("target", help="checkpoint folder or Hub repo id")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    _common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("reproduce", help="re-run the recorded recipe and compare", epilog=REPRODUCE_EPILOG,
                       formatter_class=fmt, description="Check that a checkpoint is what its recipe produces.")
    _verbosity(p, argparse.SUPPRESS)
    p.add_argument("target", help="checkpoint folder or Hub repo id")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--no-eval", action="store_true", help="compare experts, weights and scores only (faster)")
    _common(p)
    p.set_defaults(func=cmd_reproduce)
    return parser


class _EveryLineFormatter(logging.Formatter):
    """``LEVEL name: message`` on every line of a record (multi-line messages, tracebacks): a log line can never
    pass for the command's one error line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"{record.levelname} {record.name}: "
        lines = text.splitlines() or [""]
        return "\n".join([lines[0]] + [prefix + line for line in lines[1:]])


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EveryLineFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("diep_hub")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def one_line(message: object) -> str:
    """A message on one line: a multi-line one (a recipe's list of problems) joins its lines with "; "."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    rest = [line.removeprefix("- ") for line in lines[1:]]
    return lines[0] + (" " + "; ".join(rest) if rest else "")


def _os_error_message(exc: OSError) -> str:
    """An OSError with the file it concerns ("[Errno 28] No space left on device: 'out/model.safetensors'")."""
    text = str(exc)
    for name in (exc.filename, exc.filename2):
        if name is not None and str(name) not in text:
            text += f": {name}"
    return text


class _LineTrackingStream:
    """``sys.stderr`` while a command runs, remembering whether the last write ended its line.

    A progress bar leaves the cursor after its ``\\r``-drawn text; the final message must start a line of its own
    rather than continue the bar's.
    """

    def __init__(self, stream):
        self._stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _close_progress_bars() -> None:
    """Close the bars of the failed step (a ``for`` over ``tqdm`` stays open while its traceback lives): they
    would otherwise draw themselves again after the error line, when they are garbage-collected."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    for bar in list(getattr(std.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot draw must not hide the error
            pass


def _final_line(stream: _LineTrackingStream, text: str) -> None:
    _close_progress_bars()
    stream.flush()
    stream.write(("" if stream.at_line_start else "\n") + text + "\n")
    stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``diep-hub``: parse, run one command, turn every failure into one stderr line.

    Exit codes: 0 done, 1 a reproduction ran and differs, 2 an error (expected or not), 130 interrupted. With
    ``-v`` the traceback follows the error line.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = args.verbose or 0
    stderr = sys.stderr = _LineTrackingStream(sys.stderr)
    try:
        _setup_logging(verbose, bool(args.quiet))
        return _run(args, stderr, verbose)
    finally:
        sys.stderr = stderr._stream


def _run(args: argparse.Namespace, stderr: _LineTrackingStream, verbose: int) -> int:
    def fail(message: str) -> int:
        _final_line(stderr, f"diep-hub {args.command}: error: {one_line(message)}")
        if verbose:
            traceback.print_exc(file=stderr)
        return EXIT_ERROR

    try:
        return args.func(args)
    except KeyboardInterrupt:
        _final_line(stderr, f"diep-hub {args.command}: interrupted")
        return EXIT_INTERRUPTED
    except DiEPError as exc:
        return fail(str(exc))
    except OSError as exc:  # missing files, unreachable or unknown Hub repos (transformers raises OSError), full disks
        return fail(_os_error_message(exc))
    except Exception as exc:  # a bug: still one line, and it says so
        text = one_line(exc)
        text = text if len(text) <= 300 else text[:300] + "..."
        return fail(f"unexpected {type(exc).__name__}: {text}; this is a bug: run with -v for the traceback and "
                    "report it")


if __name__ == "__main__":
    sys.exit(main())
