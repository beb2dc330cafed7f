"""The ``diep-hub`` commands: each parses nothing, imports what it needs when it runs, and returns an exit code.

Heavy modules (torch, transformers, lm-eval, datasets) are imported inside the commands, so that building the
parser (``diep-hub --help``) stays cheap.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DiEPError
from .output import EXIT_MISMATCH, EXIT_OK, emit, env_text, reproduce_text, run_text

logger = logging.getLogger("diep_hub.cli")


def cmd_run(args: argparse.Namespace) -> int:
    from ..runner import run_recipe

    summary = run_recipe(
        args.recipe, dry_run=args.dry_run, push=args.push, output_dir=args.output, repo_id=args.repo_id,
        overwrite=args.overwrite,
    )
    emit(summary, args.json, run_text)
    return EXIT_OK


def _key_values(items: list[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` flags as a mapping; VALUE is read as YAML (0.5 a number, true a boolean)."""
    import yaml

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option: {item!r} -> expected KEY=VALUE, e.g. --option lr=0.5")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            options[key.strip()] = value
    return options


def cmd_prune(args: argparse.Namespace) -> int:
    from ..recipe import Recipe, RecipeError
    from ..runner import run_recipe
    from .parser import PRUNE_FLAGS

    data: dict[str, Any] = {
        "model": {"id": args.model, "dtype": args.dtype, "device_map": args.device_map,
                  "trust_remote_code": args.trust_remote_code},
        "pruning": {},
        "evaluation": {"enabled": False},
        "output": {"stock_format": args.stock_format},
    }
    for flag, path in PRUNE_FLAGS.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:  # unset: the model's own default
            *sections, key = path.split(".")
            node = data
            for section in sections:
                node = node.setdefault(section, {})
            node[key] = value
    if args.data_file:
        data["pruning"]["calibration"]["dataset"] = None  # a local file replaces the Hub dataset
    if args.option:
        data["pruning"]["options"] = _key_values(args.option)
    try:
        recipe = Recipe.from_dict(data, source="command line", base_dir=".")
    except RecipeError as exc:  # the recipe's lines, named by the flag that set the field
        flags = {path: flag for flag, path in PRUNE_FLAGS.items()} | {"pruning.options": "--option"}
        lines = [flags[line.split(":", 1)[0]] + ":" + line.split(":", 1)[1] if line.split(":", 1)[0] in flags
                 else line for line in exc.problems]
        raise ConfigError(f"invalid options ({len(lines)} problem(s)): " + "; ".join(lines)) from None
    summary = run_recipe(recipe, output_dir=args.output, push=False, overwrite=args.overwrite)
    emit(summary, args.json, run_text)
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from ..checkpoint.atomic import write_json_atomic
    from ..checkpoint.layout import EVAL_FILE
    from ..model_loading import load_model
    from ..pipeline.plan import load_settings
    from ..recipe import Recipe
    from ..runner import evaluate, evaluation_tasks

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
        model, tokenizer = load_model(load_settings(recipe))
        with tempfile.TemporaryDirectory(prefix="diep-hub-eval-") as tmp:
            names, include = evaluation_tasks(recipe, Path(tmp))  # as `run` does: tiny task files written on the fly
            return evaluate(model, tokenizer, recipe, tasks=names, include_path=include)

    recipes = [recipe_for(args.model)] + ([recipe_for(args.base)] if args.base else [])  # validate both first
    del recipes
    results: dict[str, Any] = {"pruned": run_one(args.model)}
    if args.base:
        from ..evaluation import compare

        results["base"] = run_one(args.base)
        results["comparison"] = compare(results["base"], results["pruned"])
    if args.save:
        from ..evaluation.results import evaluation_files

        for name, data in evaluation_files(results).items():  # evaluation.json + lm-eval's own results files
            (Path(args.model) / name).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(args.model) / name, data)
        logger.info("wrote %s; `diep-hub card %s` puts the results in the model card", Path(args.model) / EVAL_FILE,
                    args.model)
    from ..evaluation.results import split_raw

    slim = split_raw(results)[0]
    emit(slim if args.base else slim["pruned"], True)
    return EXIT_OK


def cmd_card(args: argparse.Namespace) -> int:
    from ..runner import rebuild_card

    card = rebuild_card(args.folder, write=not args.stdout)
    if args.stdout:
        sys.stdout.write(card + "\n")
    else:
        emit({"card": f"{args.folder}/README.md"}, args.json, lambda d: f"wrote {d['card']}")
    return EXIT_OK


def _recorded_publish_settings(folder: str) -> dict[str, Any]:
    """The ``publish`` section of the recipe saved in a checkpoint folder by `diep-hub run` ({} without one).

    The folder's config, report, evaluation and recipe are all parsed here, before the push: a damaged one is named
    with its line and column rather than failing halfway through the upload.
    """
    from ..checkpoint.inspect import read_checkpoint_metadata

    recipe = read_checkpoint_metadata(folder)["recipe"] or {}
    publish = recipe.get("publish") or {}
    return publish if isinstance(publish, dict) else {}


def _check_argument_order(args: argparse.Namespace) -> None:
    """Refuse the order of diep-hub before 0.2 (PATH REPO_ID), answered with the command in `hf upload`'s order.

    Detectable when the first argument is an existing folder and the second is no path at all (``out/tiny`` is
    also a well-formed repo id, so the order alone cannot tell).
    """
    import shlex

    if not Path(args.repo_id).is_dir() or Path(args.path).exists():
        return
    options = [f"--revision {shlex.quote(args.revision)}" if args.revision else "",
               {True: "--private", False: "--no-private"}.get(args.private, ""),
               {True: "--create-pr", False: "--no-create-pr"}.get(args.create_pr, ""),
               f"--commit-message {shlex.quote(args.commit_message)}" if args.commit_message else "",
               "--allow-pickle" if args.allow_pickle else "", "--json" if args.json else ""]
    command = " ".join(["diep-hub push", shlex.quote(args.path), shlex.quote(args.repo_id), *filter(None, options)])
    raise ConfigError(
        f"push takes REPO_ID PATH, in the order of `hf upload`; {args.repo_id!r} is a folder and {args.path!r} is "
        f"not, so the two are swapped: run `{command}`"
    )


def cmd_push(args: argparse.Namespace) -> int:
    from ..hub import push

    _check_argument_order(args)
    if args.token is not None:
        logger.warning("--token leaves your token in your shell history and in process listings; run `hf auth "
                       "login` once, or export HF_TOKEN, and drop the flag")
    recorded = _recorded_publish_settings(args.path)
    private = args.private if args.private is not None else bool(recorded.get("private", False))
    create_pr = args.create_pr if args.create_pr is not None else bool(recorded.get("create_pr", False))
    message = args.commit_message if args.commit_message is not None else recorded.get("commit_message")
    info = push(args.path, args.repo_id, token=args.token, private=private, create_pr=create_pr,
                commit_message=message, allow_pickle=args.allow_pickle, revision=args.revision)
    data = {"repo_id": args.repo_id, "revision": args.revision or "main",
            "commit_url": getattr(info, "commit_url", str(info)), "pr_url": getattr(info, "pr_url", None)}
    data["pull_request_opened"] = bool(create_pr and data["pr_url"])

    def text(d: dict) -> str:
        if create_pr and not d["pr_url"]:
            return (f"no pull request opened on {d['repo_id']}: nothing changed compared with {d['revision']} "
                    f"({d['commit_url']})")
        return f"pushed {d['repo_id']}: {d['pr_url'] or d['commit_url']}"

    emit(data, args.json, text)
    return EXIT_OK


def cmd_env(args: argparse.Namespace) -> int:
    from ..machine import environment_report

    emit(environment_report(), args.json, env_text)
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..checkpoint.inspect import format_inspection, inspect_checkpoint

    emit(inspect_checkpoint(args.target, revision=args.revision), args.json, format_inspection)
    return EXIT_OK


def cmd_reproduce(args: argparse.Namespace) -> int:
    from ..checkpoint.reproduce import reproduce

    result = reproduce(args.target, revision=args.revision, evaluate_scores=not args.no_eval)
    emit(result, args.json, reproduce_text)
    return EXIT_OK if result["match"] else EXIT_MISMATCH
