"""lm-eval integration: any lm-eval task, on a model already in memory, tasks from local files for offline use.

The default task set is the paper's zero-shot suite (MMLU, BoolQ, OpenBookQA, RTE); these download their data
from the Hub. For offline runs point ``include_path`` at a folder of task YAML files whose ``dataset_kwargs``
name local json/jsonl files by absolute path.

What a result names comes from lm-eval itself: the dataset (``dataset_path``, ``dataset_name`` as its config, the
split evaluated and, for a Hub dataset, the commit that was loaded) is read from the task objects lm-eval built
for the run, metric names are lm-eval's without the filter (``exact_match`` with ``filter: strict-match``), and
lm-eval's own results dict is kept, JSON-safe, under ``raw`` (:func:`diep_hub.evaluation.save_results` writes it
beside evaluation.json).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError
from .results import to_jsonable

logger = logging.getLogger(__name__)

DEFAULT_TASKS: tuple[str, ...] = ("mmlu", "boolq", "openbookqa", "rte")
# lm-eval metrics the card shows first, in order of preference, when a task reports several.
PRIMARY_METRICS: tuple[str, ...] = ("acc", "acc_norm", "exact_match", "f1", "mcc", "word_perplexity")


def validate_tasks(tasks: Sequence[str]) -> list[str]:
    """A list of non-empty task names, without duplicates; anything else is refused with the bad value."""
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise ConfigError(f"tasks={tasks!r} must be a list of lm-eval task names, e.g. {list(DEFAULT_TASKS)}")
    bad = [t for t in tasks if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ConfigError(f"tasks contains invalid names {bad!r}; every task must be a non-empty string")
    return list(dict.fromkeys(t.strip() for t in tasks))


def _check_common(limit, batch_size, num_fewshot, seed) -> None:
    if limit is not None and (
        isinstance(limit, bool)
        or not isinstance(limit, (int, float))
        or limit <= 0
        or (isinstance(limit, float) and limit > 1)
    ):
        raise ConfigError(f"limit={limit!r}; give a count >= 1 or a fraction in (0, 1], or None for all examples")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ConfigError(f"num_fewshot={num_fewshot!r} must be an integer >= 0")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be an integer >= 0")


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigError(
            f"lm-eval is not installed ({exc}); install the extra: pip install 'diep_hub[eval]'"
        ) from None
    return lm_eval, HFLM, TaskManager


#: TaskManagers already built, by (class, include_path, include_defaults, task files): indexing lm-eval's ~15k
#: built-in tasks takes seconds to tens of seconds, and a run needs the same index for its checks before the
#: model is loaded, for the base model's evaluation and for the pruned model's.
_MANAGERS: dict[tuple, Any] = {}
_MAX_MANAGERS = 8
LIST_TASKS_HINT = "list the available tasks with `lm-eval ls tasks` (add `--include_path DIR` for a task folder)"


def _task_files(include_path: str) -> tuple:
    """What an index of ``include_path`` depends on: its task YAML files, their sizes and times."""
    entries = []
    for root, _, files in os.walk(include_path):
        for name in files:
            if name.endswith((".yaml", ".yml")):
                full = os.path.join(root, name)
                stat = os.stat(full)
                entries.append((os.path.relpath(full, include_path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


def cached_task_manager(TaskManager, include_path: str | None, include_defaults: bool = True):
    """A TaskManager for ``include_path`` (plus lm-eval's own tasks when ``include_defaults``), built once."""
    key = (TaskManager, include_path, include_defaults, _task_files(include_path) if include_path else None)
    manager = _MANAGERS.get(key)
    if manager is None:
        logger.debug("indexing lm-eval tasks (include_path=%s, built-in tasks: %s)", include_path, include_defaults)
        manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
        while len(_MANAGERS) >= _MAX_MANAGERS:
            _MANAGERS.pop(next(iter(_MANAGERS)))
        _MANAGERS[key] = manager
    return manager


def find_unknown_tasks(tasks: Sequence[str], include_path: str | None = None) -> tuple[Any, dict[str, list[str]]]:
    """(task manager, {unknown task: close matches}) for lm-eval task names (no ConfigError: callers word it)."""
    _, _, TaskManager = _import_lm_eval()
    return _lookup(TaskManager, list(tasks), include_path)


def _lookup(TaskManager, tasks: list[str], include_path: str | None) -> tuple[Any, dict[str, list[str]]]:
    """Only the local folder is indexed when it holds every task (indexing lm-eval's built-in tasks is slow);
    otherwise the built-in tasks and the folder together. Unknown names come with up to 3 close matches."""
    if include_path is not None:
        local = cached_task_manager(TaskManager, include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local, {}
    manager = cached_task_manager(TaskManager, include_path)
    known = manager.all_tasks
    known_set = set(known)
    unknown = {t: difflib.get_close_matches(t, known, n=3, cutoff=0.6) for t in tasks if t not in known_set}
    return manager, unknown


def describe_unknown_tasks(unknown: dict[str, list[str]], include_path: str | None = None) -> str:
    """``unknown lm-eval task(s) ['boolqq'] ('boolqq': did you mean 'boolq'?): ...`` and how to list the tasks."""
    details = []
    for name, close in unknown.items():
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "no close match"
        details.append(f"{name!r}: {hint}")
    where = f" or in include_path={include_path!r}" if include_path else ""
    return (
        f"unknown lm-eval task(s) {list(unknown)} ({'; '.join(details)}): not found among lm-eval's tasks{where}; "
        f"{LIST_TASKS_HINT}, or give a folder of task YAML files as include_path"
    )


def _task_manager(TaskManager, tasks: list[str], include_path: str | None):
    """The (cached) manager that knows every task; an unknown name is refused with its close matches."""
    manager, unknown = _lookup(TaskManager, tasks, include_path)
    if unknown:
        raise ConfigError(describe_unknown_tasks(unknown, include_path))
    return manager


def split_metric(key: str) -> tuple[str, str]:
    """lm-eval's "acc,none" -> ("acc", "none")."""
    name, _, filt = key.partition(",")
    return name, filt or "none"


def primary_metric(metrics: dict[str, Any]) -> str | None:
    """The metric a card shows for a task: the first of PRIMARY_METRICS present, else the first numeric one."""
    for name in PRIMARY_METRICS:
        if isinstance(metrics.get(name), (int, float)):
            return name
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not name.endswith("_stderr"):
            return name
    return None


def run_lm_eval(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval tasks on an in-memory model; return per-task metrics, task versions and the settings used.

    Returns:
        ``{"tasks": {name: {"metrics": {"acc": .., "acc_stderr": ..}, "filter": "none", "metrics_by_filter": {..},
        "primary_metric": "acc", "version": .., "num_fewshot": .., "num_samples": .., "higher_is_better": {..},
        "dataset_path": .., "dataset_name": .., "split": .., "dataset_revision": .., "group": bool,
        "requested": bool}}, "requested_tasks": [..], "lm_eval_version": .., "date": ISO-8601, "limit": ..,
        "batch_size": .., "num_fewshot": .., "seed": .., "raw": lm-eval's results dict, JSON-safe}``
        Metric values are exactly lm-eval's (no rounding), so a card can show them unchanged.
    """
    tasks = validate_tasks(tasks)
    _check_common(limit, batch_size, num_fewshot, seed)
    if include_path is not None:
        include_path = os.fspath(include_path)
        if not os.path.isdir(include_path):
            raise ConfigError(f"include_path={include_path!r} is not a folder of lm-eval task YAML files")
    if not tasks:
        raise ConfigError("tasks is empty; name at least one lm-eval task, e.g. " + ", ".join(DEFAULT_TASKS))
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    manager = RecordingTaskManager(_task_manager(TaskManager, tasks, include_path))
    from ..criteria.capture import input_device

    device = str(input_device(model))
    was_training = model.training
    model.eval()
    logger.info("lm-eval: %s on %s (limit=%s, %d-shot, batch %d)", tasks, device, limit, num_fewshot, batch_size)
    try:
        # backend="causal": the model is in memory, so lm-eval cannot tell causal from seq2seq by its config
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, backend="causal")
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    datasets = task_datasets(manager.loaded or {})
    return _summarise(raw, tasks, datasets, limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, seed=seed)


class RecordingTaskManager:
    """A TaskManager that keeps what its ``load`` built: the task objects ``simple_evaluate`` evaluates, read
    afterwards for the dataset each task used (everything else is the wrapped manager's)."""

    def __init__(self, manager):
        self._manager = manager
        self.loaded: dict[str, Any] | None = None

    def load(self, task_list):
        self.loaded = self._manager.load(task_list)
        return self.loaded

    def __getattr__(self, name: str):
        return getattr(self._manager, name)


_COMMIT = re.compile(r"[/\\]([0-9a-f]{40})[/\\][^/\\]+$")


def dataset_revision(task) -> str | None:
    """The dataset commit a task evaluated: the revision its YAML pins (``dataset_kwargs.revision``), else the commit
    ``datasets`` resolved when loading from the Hub, which names the cache folder of the loaded files
    (``<namespace>___<name>/<config>/<version>/<commit>/``). None for local files (json, csv, ...)."""
    pinned = (getattr(task.config, "dataset_kwargs", None) or {}).get("revision")
    if isinstance(pinned, str) and pinned:
        return pinned
    dataset = getattr(task, "dataset", None)
    splits = dataset.values() if isinstance(dataset, Mapping) else [dataset] if dataset is not None else []
    for split in splits:
        for entry in getattr(split, "cache_files", None) or []:
            found = _COMMIT.search(str(entry.get("filename", "")))
            if found:
                return found.group(1)
    return None


def task_dataset(task) -> dict[str, Any]:
    """``dataset_path``, ``dataset_name`` (the config), ``split`` and ``dataset_revision`` of one lm-eval task object:
    the split is the one lm-eval scores (``eval_docs``: the test split when the task has one, else validation)."""
    config = task.config
    split = None
    if task.has_test_docs():
        split = config.test_split
    elif task.has_validation_docs():
        split = config.validation_split
    return {"dataset_path": config.dataset_path, "dataset_name": config.dataset_name, "split": split,
            "dataset_revision": dataset_revision(task)}


def task_datasets(loaded: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The dataset of every task and group ``TaskManager.load`` built. A group gets the fields its tasks share
    (MMLU: ``cais/mmlu`` and split ``test``, no single config), None where they differ."""
    out = {name: task_dataset(task) for name, task in (loaded.get("tasks") or {}).items()}
    for name, group in (loaded.get("groups") or {}).items():
        members = [out[t.task_name] for t in group.get_all_tasks() if t.task_name in out]
        if members:
            out[name] = {key: members[0][key] if all(m[key] == members[0][key] for m in members) else None
                         for key in members[0]}
    return out


def metrics_by_filter(row: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's ``{"exact_match,strict-match": .., "exact_match_stderr,strict-match": ..}`` as
    ``{"strict-match": {"exact_match": .., "exact_match_stderr": ..}}``, in lm-eval's order."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in row.items():
        if key in ("name", "alias", "sample_len", " ") or "," not in key:
            continue
        metric, filt = split_metric(key)
        out.setdefault(filt, {})[metric] = value
    return out


def _iso_date(timestamp: Any) -> str | None:
    from datetime import UTC, datetime

    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
        return None
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def jsonable_raw(raw: Mapping[str, Any]) -> dict[str, Any]:
    """lm-eval's results dict as JSON: lm-eval's own conversion (``handle_non_serializable``, as its
    EvaluationTracker writes it), then non-finite numbers as strings."""
    from lm_eval.utils import handle_non_serializable

    return to_jsonable(json.loads(json.dumps(raw, default=handle_non_serializable)))


def _summarise(raw: dict[str, Any], requested: list[str], datasets: Mapping[str, dict[str, Any]],
               **settings) -> dict[str, Any]:
    results = raw.get("results", {})
    groups = set(raw.get("groups", {})) | set(raw.get("group_subtasks", {}) or {})
    configs = raw.get("configs", {})
    out: dict[str, Any] = {}
    for name, row in results.items():
        by_filter = metrics_by_filter(row)
        # the unfiltered metrics when lm-eval reports them, else the task's first filter (gsm8k: strict-match)
        chosen = "none" if "none" in by_filter else next(iter(by_filter), "none")
        metrics = by_filter.get(chosen, {})
        config = configs.get(name, {})
        dataset = datasets.get(name) or {"dataset_path": config.get("dataset_path"),
                                         "dataset_name": config.get("dataset_name"), "split": None,
                                         "dataset_revision": None}
        samples = raw.get("n-samples", {}).get(name, {})
        out[name] = {
            "metrics": to_jsonable(metrics),
            "filter": chosen,
            "metrics_by_filter": to_jsonable(by_filter),
            "primary_metric": primary_metric(metrics),
            "version": raw.get("versions", {}).get(name),
            "num_fewshot": raw.get("n-shot", {}).get(name),
            "num_samples": samples.get("effective") if isinstance(samples, dict) else None,
            "higher_is_better": to_jsonable(raw.get("higher_is_better", {}).get(name, {})),
            **dataset,
            "group": name in groups and name not in configs,
            "requested": name in requested,
        }
    return {
        "tasks": out,
        "requested_tasks": list(requested),
        "lm_eval_version": raw.get("lm_eval_version"),
        "date": _iso_date(raw.get("date")),
        **settings,
        "raw": jsonable_raw(raw),
    }
