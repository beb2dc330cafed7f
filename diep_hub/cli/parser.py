"""The ``diep-hub`` argument parser: commands, their examples, and ``prune``'s flags built from the option models.

Building it imports pydantic and the option models (``diep_hub.options``, ``diep_hub.recipe``), never torch: the
method list in ``prune --help`` comes from the criteria registry only when that help is printed.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel

from ..checkpoint.layout import CARD_FILE, EVAL_FILE, RECIPE_FILE, REPORT_FILE
from ..options import field_help
from ..recipe import ModelSection, Recipe
from . import commands

MAIN_EPILOG = """\
examples:
  diep-hub run recipes/tiny.yaml --output out/tiny          # the whole flow, offline (~30 s the first time)
  diep-hub run recipes/mixtral-8x7b-diep-50.yaml --dry-run  # memory and time estimate, no weights loaded
  diep-hub inspect out/tiny                                  # experts per layer, method, results
  diep-hub reproduce out/tiny                                # re-run the recorded recipe and compare
  diep-hub push my-user/tiny-mixtral-diep-50 out/tiny        # publish, as `hf upload REPO_ID PATH` (needs HF_TOKEN)
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
pruned model -> model card -> save (weights, config, remote code, {report}, {evaluation},
{recipe}, {card}) -> push (if asked). Recipe problems are all reported at once, before anything loads.

recipe sections (unknown keys are errors):
{sections}
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
  diep-hub eval out/my-model --tasks my_task --include-path tasks/ --limit 100
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
  diep-hub push my-user/tiny-mixtral-diep-50 out/tiny
  diep-hub push my-org/Mixtral-8x7B-DiEP-50 out/mixtral --private --create-pr --commit-message "DiEP 50%"
  diep-hub push my-user/tiny-mixtral-diep-50 out/tiny --revision experiments

REPO_ID PATH, in the order of `hf upload`. The token comes from HF_TOKEN, `hf auth login` or --token (a token on
the command line stays in the shell history); it is checked before any upload and never printed. Unset options take
the folder recipe's publish section (private, create_pr, commit_message).
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




def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _verbosity(p: argparse.ArgumentParser, default: Any) -> None:
    # On the main parser and on every subcommand, so `diep-hub -q run ...` and `diep-hub run ... -q` both work.
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="show the traceback of an error (-vv: also debug logs)")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="only warnings and errors on stderr")


def _model_args(p: argparse.ArgumentParser) -> None:
    dtype = ModelSection.model_fields["dtype"]
    p.add_argument("--dtype", default=dtype.default, choices=list(get_args(dtype.annotation)))
    p.add_argument("--device-map", default=None, help="accelerate device map, e.g. auto or cpu (default: none)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the Hub")


def _command(sub: Any, name: str, func: Any, formatter_class: type = argparse.RawDescriptionHelpFormatter,
             **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand's parser, with what every subcommand has: -v/-q after the command, and ``func`` to run."""
    p = sub.add_parser(name, formatter_class=formatter_class, **kwargs)
    _verbosity(p, argparse.SUPPRESS)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render the docs)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="diep-hub", formatter_class=fmt, epilog=MAIN_EPILOG,
        description="Prune Mixture-of-Experts models with DiEP (arXiv 2509.16105) and publish them on the Hub.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"diep-hub {__version__}")
    _verbosity(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "env", commands.cmd_env, help="versions, platform and Hub settings, for bug reports",
                 epilog=ENV_EPILOG, description="Print what a bug report needs (never the token itself).")
    _common(p)

    p = _command(sub, "run", commands.cmd_run, help="run a recipe: prune, evaluate, card, save, push",
                 epilog=RUN_EPILOG.format(sections=recipe_sections(), report=REPORT_FILE, evaluation=EVAL_FILE,
                                          recipe=RECIPE_FILE, card=CARD_FILE),
                 description="Run a YAML recipe end to end.")
    p.add_argument("recipe", help="recipe file (YAML), or the name of a shipped recipe such as 'tiny'")
    p.add_argument("--dry-run", action="store_true", help="estimate memory and time from the config; load no weights")
    p.add_argument("--push", dest="push", action="store_true", default=None,
                   help="push to the Hub (overrides the recipe)")
    p.add_argument("--no-push", dest="push", action="store_false", help="do not push, whatever the recipe says")
    p.add_argument("--output", default=None, help="output folder (overrides output.dir)")
    p.add_argument("--repo-id", default=None, help="Hub repository namespace/name (overrides publish.repo_id)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    _common(p)

    p = _command(sub, "prune", commands.cmd_prune, help="prune a model (no evaluation)", epilog=PRUNE_EPILOG,
                 formatter_class=_Help, description="Prune a model from command-line options and save the checkpoint.")
    p.add_argument("model", help="Hub model id, local folder, or diep-hub/tiny-mixtral")
    p.add_argument("--output", required=True, help="output folder")
    _option_flags(p)
    p.add_argument("--option", action="append", default=None, metavar="KEY=VALUE",
                   help="an option of a method that has no flags of its own, e.g. --method diep_removal --option "
                        "lr=0.5 (repeatable; the recipe's pruning.options)")
    p.add_argument("--stock-format", action="store_true", help="save as the stock architecture (uniform counts)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    _model_args(p)
    _common(p)

    p = _command(sub, "eval", commands.cmd_eval, help="evaluate a model or a pruned checkpoint", epilog=EVAL_EPILOG,
                 description="Evaluate with lm-eval tasks, speed and memory probes.")
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
                   help=f"write the results into MODEL/{EVAL_FILE}, where `diep-hub card` reads them")
    _model_args(p)

    p = _command(sub, "card", commands.cmd_card, help="(re)write the model card of a checkpoint folder",
                 epilog=CARD_EPILOG, description="Build README.md from the report, evaluation and recipe.")
    p.add_argument("folder", help="checkpoint folder written by `diep-hub run` or `prune`")
    p.add_argument("--stdout", action="store_true", help="print the card instead of writing README.md")
    _common(p)

    p = _command(sub, "push", commands.cmd_push, help="push a checkpoint folder to the Hub", epilog=PUSH_EPILOG,
                 description="Upload a checkpoint folder to a Hub model repository in one commit.")
    p.add_argument("repo_id", help="the Hub repository, namespace/name (created if missing)")
    p.add_argument("path", help="checkpoint folder written by `diep-hub run` or `prune`")
    p.add_argument("--revision", default=None,
                   help="branch to commit to (default: main); created from main when missing")
    p.add_argument("--token", default=None,
                   help="a User Access Token with write access (default: HF_TOKEN or the `hf auth login` token)")
    p.add_argument("--private", action=argparse.BooleanOptionalAction, default=None,
                   help="create the repository as private (default: the folder recipe's publish.private, else no); "
                        "an existing repository keeps its visibility")
    p.add_argument("--create-pr", action=argparse.BooleanOptionalAction, default=None,
                   help="open a pull request instead of committing (default: publish.create_pr, else no)")
    p.add_argument("--commit-message", "--message", dest="commit_message", default=None,
                   help="the commit's title (default: publish.commit_message, else method and experts kept)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also upload pickle weights (*.bin, *.pt, *.pth, *.pkl); refused by default: loading a "
                   "pickle can run arbitrary code")
    _common(p)

    p = _command(sub, "inspect", commands.cmd_inspect, help="show experts per layer, method and results",
                 epilog=INSPECT_EPILOG, description="Describe a pruned checkpoint (folder or Hub repo).")
    p.add_argument("target", help="checkpoint folder or Hub repo id")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    _common(p)

    p = _command(sub, "reproduce", commands.cmd_reproduce, help="re-run the recorded recipe and compare",
                 epilog=REPRODUCE_EPILOG, description="Check that a checkpoint is what its recipe produces.")
    p.add_argument("target", help="checkpoint folder or Hub repo id")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--no-eval", action="store_true", help="compare experts, weights and scores only (faster)")
    _common(p)
    return parser


# --------------------------------------------------------------------------------------------- option flags
#: ``diep-hub prune`` flags: flag -> the recipe field it sets. Help, default and choices come from that field's
#: model (``diep_hub.options``), so the flag, the recipe key and the ``DiEPPruner`` keyword share one declaration.
PRUNE_FLAGS = {
    "--sparsity": "pruning.sparsity",
    "--method": "pruning.method",
    "--selection": "pruning.selection",
    "--dataset": "pruning.calibration.dataset",
    "--dataset-config": "pruning.calibration.config",
    "--data-file": "pruning.calibration.path",
    "--split": "pruning.calibration.split",
    "--text-field": "pruning.calibration.text_field",
    "--num-samples": "pruning.calibration.num_samples",
    "--seq-len": "pruning.calibration.seq_len",
    "--search-mode": "pruning.search.mode",
    "--lr": "pruning.search.lr",
    "--epochs": "pruning.search.epochs",
    "--batch-size": "pruning.search.batch_size",
    "--seed": "pruning.seed",
    "--min-experts-per-layer": "pruning.floors.min_experts_per_layer",
    "--max-layer-sparsity": "pruning.floors.max_layer_sparsity",
    "--regroup": "pruning.floors.regroup",
    "--merge": "pruning.merge",
    "--merge-alignment": "pruning.merge_alignment",
    "--recalibrate": "pruning.recalibration.enabled",
    "--recalibration-steps": "pruning.recalibration.steps",
    "--recalibration-lr": "pruning.recalibration.lr",
    "--output-scales": "pruning.recalibration.output_scales",
    "--output-scale-lr": "pruning.recalibration.output_scale_lr",
}
#: flags left unset by default, so that the recipe's own default applies (the search's hyper-parameters)
UNSET_BY_DEFAULT = ("--search-mode", "--lr", "--epochs")


def recipe_field(path: str) -> tuple[type[BaseModel], str]:
    """The model class and field name at a recipe path (``pruning.search.lr`` -> SearchSection, "lr")."""
    model: type[BaseModel] = Recipe
    *sections, name = path.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model, name


def _number_or_text(text: str) -> Any:
    """A number flag's value as the Python API would receive it ("2.5" -> 2.5, "nan" -> nan, "ten" stays text):
    the models give the verdict, in the same words as for the API and the recipe, on one line."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _plain_types(annotation: Any) -> list[Any]:
    """The types inside a field's annotation, through unions and ``Annotated`` (``Fraction | None`` -> float, None)."""
    if get_origin(annotation) is Annotated:
        return _plain_types(get_args(annotation)[0])
    args = get_args(annotation)
    return [t for arg in args for t in _plain_types(arg)] if args else [annotation]


def _option_flags(p: argparse.ArgumentParser) -> None:
    for flag, path in PRUNE_FLAGS.items():
        model, name = recipe_field(path)
        info = model.model_fields[name]
        numeric = any(t in (int, float) for t in _plain_types(info.annotation))
        default = None if flag in UNSET_BY_DEFAULT else info.default
        text = field_help(model, name).replace("%", "%%")
        if name == "method":
            text = text.replace(" (default:", "; one of: {methods} (default:")
        if info.annotation is bool:  # a switch: given means true
            p.add_argument(flag, action="store_true", default=default, help=text)
            continue
        p.add_argument(flag, default=default, type=_number_or_text if numeric else str, help=text)


class _Help(argparse.RawDescriptionHelpFormatter):
    """Fills ``{methods}`` from the criteria registry, only when the help is printed (the registry imports torch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action) or ""
        if "{methods}" in text:
            from ..criteria import available_criteria

            text = text.replace("{methods}", ", ".join(available_criteria()))
        return text


def recipe_sections(model: type[BaseModel] = Recipe, width: int = 100) -> str:
    """The recipe's keys per section, with the choices of each Literal field, for ``run --help``."""

    def keys(cls: type[BaseModel]) -> str:
        parts = []
        for name, info in cls.model_fields.items():
            key = info.alias or name
            args = get_args(info.annotation)
            nested = next((a for a in (info.annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)),
                          None)
            literal = [a for a in args if isinstance(a, str)]
            if nested is not None:
                parts.append(f"{key} {{{keys(nested)}}}")
            elif literal:
                parts.append(f"{key} ({'|'.join(literal)})")
            else:
                parts.append(key)
        return ", ".join(parts)

    lines = []
    for name, info in model.model_fields.items():
        lines += textwrap.wrap(keys(info.annotation), width, initial_indent=f"  {name + ':':<12}",
                               subsequent_indent=" " * 14)
    return "\n".join(lines)
