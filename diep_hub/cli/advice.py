"""Error messages in the words of the command line: the flag to use, not the Python keyword.

The library words its advice for its Python API ("pass overwrite=True", "pass token=...", "relax
min_experts_per_layer"), which is right for the API and wrong for a ``diep-hub`` user. :func:`cli_message` rewrites
a message at the CLI boundary, from one table (:data:`KEYWORDS`): a keyword becomes the command's flag
(``--overwrite``); for ``run``, which takes a recipe, the recipe field (``pruning.floors.regroup: true``). A recipe
field set by a flag is named by that flag (``prune --seq-len``, ``run --output``). The library's messages stay as
they are; each rewrite is tested through the command that reaches it (tests/test_faults_cli_*.py).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping

#: Python keyword -> (recipe field, {command: flag}). ``prune``'s flags come from ``parser.PRUNE_FLAGS`` (the field
#: a flag sets), so only flags that set no recipe field are listed here.
KEYWORDS: dict[str, tuple[str | None, dict[str, str]]] = {
    "token": (None, {"push": "--token"}),
    "overwrite": (None, {"run": "--overwrite", "prune": "--overwrite"}),
    "allow_pickle": (None, {"push": "--allow-pickle"}),
    "create_pr": ("publish.create_pr", {"push": "--create-pr"}),
    "revision": (None, {"push": "--revision"}),
    "private": ("publish.private", {"push": "--private"}),
    "commit_message": ("publish.commit_message", {"push": "--commit-message"}),
    "sparsity": ("pruning.sparsity", {}),
    "regroup": ("pruning.floors.regroup", {}),
    "min_experts_per_layer": ("pruning.floors.min_experts_per_layer", {}),
    "max_layer_sparsity": ("pruning.floors.max_layer_sparsity", {}),
    "num_samples": ("pruning.calibration.num_samples", {}),
    "seq_len": ("pruning.calibration.seq_len", {}),
}
#: ``run`` flags that override a recipe field: named instead of the field when they were given.
RUN_OVERRIDES = {"output.dir": ("output", "--output"), "publish.repo_id": ("repo_id", "--repo-id"),
                 "publish.push": ("push", "--push")}

_VALUE = r"(\.\.\.|\[[^\]]*\]|'[^']*'|\"[^\"]*\"|[\w.+-]+)"
_NAMES = "|".join(sorted(KEYWORDS, key=len, reverse=True))
_PASS = re.compile(rf"\bpass ({_NAMES})={_VALUE}")
_ASSIGN = re.compile(rf"(?<![\w.\-])({_NAMES})={_VALUE}")
# A bare keyword name ("relax max_layer_sparsity / min_experts_per_layer"): only names with an underscore, so that
# ordinary words ("the sparsity", "the token") are left alone; never part of a dotted recipe path.
_BARE = re.compile(rf"(?<![\w.\-`])({'|'.join(k for k in KEYWORDS if '_' in k)})(?![\w=])")


def _flags(command: str) -> dict[str, str]:
    """Recipe field -> the flag of ``command`` that sets it."""
    if command == "prune":
        from .parser import PRUNE_FLAGS

        return {field: flag for flag, field in PRUNE_FLAGS.items()}
    return {}


#: the calibration loader also reads perplexity text: its messages start "perplexity source ..."
PERPLEXITY_FIELDS = {"num_samples": "evaluation.perplexity.num_samples", "seq_len": "evaluation.perplexity.seq_len"}


def _field(keyword: str, message: str) -> str | None:
    if keyword in PERPLEXITY_FIELDS and message.startswith("perplexity"):
        return PERPLEXITY_FIELDS[keyword]
    return KEYWORDS[keyword][0]


def _flag_of(keyword: str, command: str, message: str = "") -> str | None:
    field, flags = _field(keyword, message), KEYWORDS[keyword][1]
    return flags.get(command) or (_flags(command).get(field) if field else None)


def _yaml_value(value: str) -> str:
    return {"True": "true", "False": "false", "None": "null"}.get(value, value)


def _assignment(keyword: str, value: str, command: str, message: str, *, advice: bool) -> str | None:
    """``keyword=value`` in the command's words: ``--flag [value]``, or for ``run`` ``field: value``."""
    flag = _flag_of(keyword, command, message)
    if flag is not None:
        if value == "True":
            return flag
        if value == "...":
            return f"{flag} TOKEN" if keyword == "token" else flag
        if value == "False" or value.startswith("["):
            return None  # no flag form (a list is the Python API's per-layer choice)
        return f"{flag} {value.strip(chr(39))}"
    field = _field(keyword, message)
    if command == "run" and field is not None:
        text = f"{field}: {_yaml_value(value)}"
        return f"set {text} in the recipe" if advice else text
    return None


def _bare(keyword: str, command: str, message: str) -> str | None:
    flag = _flag_of(keyword, command, message)
    if flag is not None:
        return flag
    field = _field(keyword, message)
    return field if command == "run" else None


def cli_message(message: str, args: argparse.Namespace | Mapping) -> str:
    """``message`` with the Python API's advice replaced by the flag (or recipe field) of ``args.command``."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    command = str(values.get("command") or "")
    text = _local_data_hint(message, command)

    def passed(match: re.Match) -> str:
        words = _assignment(match.group(1), match.group(2), command, message, advice=True)
        return match.group(0) if words is None else (words if words.startswith("set ") else f"pass {words}")

    def assigned(match: re.Match) -> str:
        words = _assignment(match.group(1), match.group(2), command, message, advice=False)
        return match.group(0) if words is None else words

    def bare(match: re.Match) -> str:
        return _bare(match.group(1), command, message) or match.group(0)

    text = _ASSIGN.sub(assigned, _PASS.sub(passed, text))
    text = _BARE.sub(bare, text)
    fields = dict(_flags(command))
    if command == "run":
        fields |= {field: flag for field, (dest, flag) in RUN_OVERRIDES.items() if values.get(dest) is not None}
    for field in sorted(fields, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.]){re.escape(field)}(?![\w])", fields[field], text)
    return text


def _local_data_hint(message: str, command: str) -> str:
    """The calibration loader's "pass local data instead: ... load_calibration_data(...)" as a flag or recipe key."""
    try:
        from ..calibration_sources import LOCAL_DATA_HINT
    except ImportError:  # pragma: no cover - the module is part of the package
        return message
    if LOCAL_DATA_HINT not in message:
        return message
    kinds = ".json, .jsonl, .parquet or .txt"
    if command == "prune":
        hint = f"give a local file instead: --data-file FILE ({kinds})"
    else:
        hint = (f"give a local file instead: the recipe's path key (pruning.calibration.path, "
                f"evaluation.perplexity.path; {kinds})")
    return message.replace(LOCAL_DATA_HINT, hint)


__all__ = ["KEYWORDS", "RUN_OVERRIDES", "cli_message"]
