"""Checks of a run's inputs that need no weights: refuse a bad run in seconds, before the model is loaded.

:func:`check_run_inputs` runs right after the recipe is validated and the model's config is read (no weights), in
``diep-hub run`` and in its dry run. It checks, in this order, one class of problem at a time (the first class
with problems raises; every problem of that class is in the one message):

1. data sources: the calibration and perplexity sources are reachable (a local file exists, is readable and its
   content is valid text data; a Hub dataset name is refused at once while offline mode is on), and the lm-eval
   ``include_path`` is a folder;
2. lengths: ``seq_len`` of calibration and perplexity fit the model's ``max_position_embeddings``;
3. lm-eval task names exist (built-in, offline ones of diep_hub, or in ``include_path``), with close matches for
   a typo. Indexing lm-eval's tasks takes seconds, so it only happens when evaluation is on and names tasks, and
   the index is kept for the evaluation itself (:func:`diep_hub.evaluation.lm_eval_runner.cached_task_manager`).

Nothing is written (offline corpora are only recognised by name) and nothing is downloaded.

:func:`check_model_reachable` runs before the model's config is read: a Hub model id while the Hub cannot be
reached (offline mode on, or one connection attempt failing within :data:`CONNECT_TIMEOUT` seconds) is refused at
once, rather than after huggingface_hub's retries (5 attempts, about 30 s).
"""

from __future__ import annotations

import difflib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import ConfigError, CorruptFileError, DiEPError
from .recipe import Recipe

logger = logging.getLogger(__name__)

OFFLINE_SWITCHES = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE"
#: seconds the one connection attempt to the Hub may take before the Hub counts as unreachable
CONNECT_TIMEOUT = 3.0


def hub_unreachable_reason(timeout: float = CONNECT_TIMEOUT) -> str | None:
    """Why the Hub cannot be used now, or None: offline mode is on, or ONE TCP connection to the endpoint's host
    fails within ``timeout`` seconds (no retries; a proxy in the environment is not consulted)."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    from .calibration_sources import hub_offline

    if hub_offline():
        return f"offline mode is on ({OFFLINE_SWITCHES} is set)"
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}:{port} cannot be reached ({exc.strerror or type(exc).__name__}, one attempt, {timeout:g} s)"
    return None


def _config_in_cache(model_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except ValueError:  # not a valid repo id: AutoConfig words that error itself
        return False
    return isinstance(found, str)


def check_model_reachable(load: Any) -> None:
    """Refuse at once a Hub model whose config cannot be had: the Hub is unreachable and the config is not in the
    local Hub cache (or is, but offline mode is off, so transformers would still retry the network first).

    Args:
        load: the load stage's :class:`~diep_hub.pipeline.plan.LoadConfig`. Offline models and local folders pass.

    Raises:
        ConfigError: naming the model, why the Hub is unreachable, and what to do.
    """
    from .calibration_sources import hub_offline
    from .model_loading import _HUB_ID, _local_model_folder

    if load.offline or _local_model_folder(load.model_id) is not None or not _HUB_ID.fullmatch(load.model_id):
        return  # not a Hub id: the loader names what it is not (a missing folder, a malformed id)
    reason = hub_unreachable_reason()
    if reason is None:
        return
    cached = _config_in_cache(load.model_id, load.revision)
    if cached and hub_offline():
        return  # transformers reads the cache without touching the network
    advice = ("its config is in the local Hub cache: set HF_HUB_OFFLINE=1 to use it" if cached else
              "it is not in the local Hub cache -> run where the Hub is reachable, or give model.id as a local "
              "folder holding the checkpoint")
    raise ConfigError(f"model.id: {load.model_id!r} is a Hub repo, but the Hub cannot be used: {reason}; {advice}")


def check_run_inputs(recipe: Recipe, model_config: Any = None) -> None:
    """Refuse, before any weights load, what a recipe asks for that cannot work.

    Args:
        recipe: a validated recipe (relative paths resolve against its folder).
        model_config: the model's config (``transformers.PretrainedConfig``), when read; enables the length checks.

    Raises:
        ConfigError: the problems of the first failing class, one ``field: value -> what is allowed`` each.
        CorruptFileError: when every problem of that class is a damaged local data file.
    """
    _check(recipe, model_config, dry_run=False)


def check_dry_run_inputs(recipe: Recipe, model_config: Any = None) -> list[str]:
    """:func:`check_run_inputs` for a dry run, which reads no data: a Hub dataset that offline mode keeps out of
    reach is returned as a note (the run will need it) instead of refused. Everything else raises the same."""
    return _check(recipe, model_config, dry_run=True)


def _check(recipe: Recipe, model_config: Any, *, dry_run: bool) -> list[str]:
    problems = _source_problems(recipe)
    notes = [text for text, kind in problems if kind is _OfflineHubData] if dry_run else []
    _raise([(text, ConfigError if kind is _OfflineHubData else kind) for text, kind in problems if text not in notes])
    if model_config is not None:
        _raise(_length_problems(recipe, model_config))
    _raise(_task_problems(recipe))
    return notes


class _OfflineHubData(ConfigError):
    """Marks a Hub dataset that offline mode keeps out of reach (a ConfigError for a run, a note for a dry run)."""


def _raise(problems: list[tuple[str, type[DiEPError]]]) -> None:
    """One error for a class of problems: CorruptFileError when they are all damaged files, else ConfigError."""
    if not problems:
        return
    kinds = {kind for _, kind in problems}
    kind = CorruptFileError if kinds == {CorruptFileError} else ConfigError
    lines = [text for text, _ in problems]
    if len(lines) == 1:
        raise kind(lines[0])
    raise kind(f"{len(lines)} problems, found before loading the model: " + "; ".join(lines))


# ----------------------------------------------------------------------------------------------- data sources
def _text_sections(recipe: Recipe) -> list[tuple[str, Any]]:
    """(field prefix, section) of every text source the run will read."""
    sections = [("pruning.calibration", recipe.pruning.calibration)]
    ev = recipe.evaluation
    if ev.enabled and ev.perplexity is not None:
        sections.append(("evaluation.perplexity", ev.perplexity))
    return sections


def _source_problems(recipe: Recipe) -> list[tuple[str, type[DiEPError]]]:
    problems = []
    for prefix, section in _text_sections(recipe):
        problem = _source_problem(recipe, prefix, section)
        if problem is not None:
            problems.append(problem)
    ev = recipe.evaluation
    if ev.enabled and ev.include_path is not None:
        include = recipe.resolve_path(ev.include_path)
        if not Path(include).is_dir():
            state = "is a file" if Path(include).exists() else "does not exist"
            problems.append((f"evaluation.include_path: {ev.include_path!r} {state} ({include}) -> a folder of "
                             "lm-eval task YAML files (relative paths start at the recipe's folder)", ConfigError))
    return problems


def _source_problem(recipe: Recipe, prefix: str, section) -> tuple[str, type[DiEPError]] | None:
    from .calibration_sources import check_text_file, hub_offline

    purpose = "calibration" if prefix.startswith("pruning") else "perplexity"
    if section.path is not None:
        path = recipe.resolve_path(section.path)
        if not Path(path).is_file():
            state = "is a folder" if Path(path).is_dir() else "does not exist"
            return (f"{prefix}.path: {section.path!r} {state} ({path}) -> an existing json/jsonl/parquet/txt file "
                    "(relative paths start at the recipe's folder)", ConfigError)
        if not os.access(path, os.R_OK):
            return f"{prefix}.path: {section.path!r} is not readable ({path}): permission denied", ConfigError
        try:
            check_text_file(path, section.text_field, what=f"{purpose} file")
        except (ConfigError, CorruptFileError) as exc:
            return f"{prefix}.path: {exc}", type(exc)
        return None
    name = str(section.dataset)
    offline = _offline_corpus_splits(name)
    if offline is not None:
        if section.split not in offline:
            return (f"{prefix}.split: {section.split!r} -> {name} (diep_hub's offline corpus) has the splits "
                    f"{', '.join(offline)}", ConfigError)
        return None
    if hub_offline() and not _cached_while_offline(name):
        return (
            f"{prefix}.dataset: {name!r} is a Hub dataset, but offline mode is on ({OFFLINE_SWITCHES} is set) and "
            f"it is not in the local datasets cache -> give {prefix}.path (a local json/jsonl/parquet/txt file) "
            "instead, or unset the offline switches",
            _OfflineHubData,
        )
    return None


def _offline_corpus_splits(name: str) -> tuple[str, ...] | None:
    """The splits of diep_hub's own offline corpora (model_loading.text_source writes them); None for other names."""
    from .tiny import TINY_TEXT_ID, ZOO_TEXT_ID

    if name == TINY_TEXT_ID:
        return ("train", "test")  # tiny.tiny_texts
    if name == ZOO_TEXT_ID:
        from .zoo.domains import SPLITS

        return tuple(SPLITS)  # "train" is read as the zoo's "calibration" split
    return None


def _cached_while_offline(name: str) -> bool:
    """Whether the calibration loader can still serve a Hub dataset offline: ``datasets`` itself is in offline
    mode (else the loader refuses, as it would otherwise retry the network) and the dataset is in a local cache.

    Only the cache folders are looked at (``datasets``' own and the Hub download cache): no network, no retries.
    """
    import datasets
    from huggingface_hub import constants

    if not datasets.config.HF_HUB_OFFLINE:
        return False
    prepared = Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___")
    downloaded = Path(constants.HF_HUB_CACHE) / ("datasets--" + name.replace("/", "--"))
    return prepared.is_dir() or downloaded.is_dir()


# ---------------------------------------------------------------------------------------------------- lengths
def _length_problems(recipe: Recipe, config: Any) -> list[tuple[str, type[DiEPError]]]:
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return []
    problems = []
    for prefix, section in _text_sections(recipe):
        if section.seq_len > limit:
            problems.append((
                f"{prefix}.seq_len: {section.seq_len} -> above the model's max_position_embeddings {limit}; "
                f"use at most {limit}",
                ConfigError,
            ))
    return problems


# ------------------------------------------------------------------------------------------------------ tasks
def _task_problems(recipe: Recipe) -> list[tuple[str, type[DiEPError]]]:
    from .evaluation.lm_eval_runner import describe_unknown_tasks, find_unknown_tasks, validate_tasks
    from .tiny import TINY_TASK

    ev = recipe.evaluation
    if not ev.enabled or not ev.tasks:
        return []
    tasks = validate_tasks(ev.tasks)
    include = recipe.resolve_path(ev.include_path)
    if include is None:
        # As runner.evaluation_tasks: without include_path, diep_hub's offline tasks are written on the fly.
        offline = _offline_task_names(tasks)
        tasks = [t for t in tasks if t not in offline]
        if not tasks:
            return []
    _, unknown = find_unknown_tasks(tasks, include)
    if not unknown:
        return []
    if include is None:  # a typo of an offline task is suggested too
        offline = sorted(_offline_task_names([TINY_TASK, "zoo_"]))
        unknown = {name: (difflib.get_close_matches(name, offline, n=3, cutoff=0.6) + close)[:3]
                   for name, close in unknown.items()}
    return [(f"evaluation.tasks: {describe_unknown_tasks(unknown, ev.include_path)}", ConfigError)]


def _offline_task_names(tasks: list[str]) -> set[str]:
    """Names of the offline tasks (diep_tiny_arith, zoo_*) that runner.evaluation_tasks would write for ``tasks``.

    The task files are written exactly as the run writes them, into a temporary folder removed at once.
    """
    from .tiny import is_offline_task, write_offline_tasks

    if not any(is_offline_task(t) for t in tasks):
        return set()
    with tempfile.TemporaryDirectory(prefix="diep-hub-tasks-") as tmp:
        folder = write_offline_tasks(tasks, tmp)
        return {p.stem for p in Path(folder).glob("*.yaml")} if folder is not None else set()


__all__ = [
    "CONNECT_TIMEOUT",
    "check_dry_run_inputs",
    "check_model_reachable",
    "check_run_inputs",
    "hub_unreachable_reason",
]
