"""The card's evaluation tables: base vs pruned per task (with standard errors and item counts), the retention
summary, perplexity / speed / memory pairs, and the Hub's two result formats (model-index ``EvalResult`` rows in
the front matter, ``.eval_results/*.yaml`` entries for benchmarks the Hub tracks).

Everything here is computed from evaluation results (``evaluate_model`` output, or ``{"base", "pruned",
"comparison"}``); the template only formats it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, EvalResultEntry

from ..evaluation.comparison import higher_is_better, metric_retention
from ..evaluation.lm_eval_runner import primary_metric

if TYPE_CHECKING:
    from .inputs import CardInputs

# The Hub's registered benchmark datasets (https://huggingface.co/docs/hub/eval-results: a dataset becomes a
# benchmark by an allow-list on the Hub, which no library exposes), keyed by (Hub dataset id, config) as lm-eval's
# task objects name them (config None: any config), with the benchmark's task id. Only results on these get a
# `.eval_results/` entry; every other result stays in the model-index. Callers add more with ``benchmarks=``.
HUB_BENCHMARKS: dict[tuple[str, str | None], str] = {
    ("Idavidrein/gpqa", "gpqa_diamond"): "gpqa_diamond",  # lm-eval gpqa_diamond_*; huggingface_hub's own example
    ("TIGER-Lab/MMLU-Pro", None): "mmlu_pro",  # lm-eval mmlu_pro
}


def _number(value: Any) -> float | None:
    """A finite int/float (lm-eval writes "N/A" where it could not compute a standard error); else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass
class ResultRow:
    """One task metric, base vs pruned (either side may be missing), with lm-eval's standard errors."""

    task: str
    metric: str
    base: float | None
    pruned: float | None
    retention: float | None
    stderr: float | None = None  # the pruned model's standard error
    version: Any = None
    num_fewshot: int | None = None
    num_samples: int | None = None
    dataset: str | None = None  # lm-eval's dataset_path (a Hub dataset id, or a builder such as json)
    base_stderr: float | None = None
    retention_stderr: float | None = None
    filter: str | None = None  # lm-eval's filter of the metric ("strict-match"); None for its "none"
    dataset_config: str | None = None  # lm-eval's dataset_name
    split: str | None = None  # the split lm-eval scored
    dataset_revision: str | None = None  # the dataset commit, when lm-eval loaded it from the Hub

    @property
    def hub_dataset(self) -> str | None:
        """``dataset`` when it names a Hub dataset, not one of datasets' file builders or a local folder."""
        return self.dataset if is_hub_dataset(self.dataset) else None


@dataclass
class RetentionSummary:
    """Mean retention over the tasks, its standard error and how many items it rests on (no single headline)."""

    mean: float
    stderr: float | None
    tasks: int
    num_items: int | None


def is_hub_dataset(path: Any) -> bool:
    """A Hub dataset id (``aps/super_glue``, or a legacy canonical name), not a builder for local files (datasets'
    packaged modules: json, csv, parquet, ...) or a local path."""
    if not isinstance(path, str) or not path or path.startswith((".", "/", "~")) or os.path.exists(path):
        return False
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return path not in _PACKAGED_DATASETS_MODULES and path.count("/") <= 1


def split_evaluation(evaluation: Mapping[str, Any] | None) -> tuple[dict | None, dict | None, dict | None]:
    """(base, pruned, comparison) from either ``{"base", "pruned", "comparison"}`` or one model's results."""
    if not evaluation:
        return None, None, None
    if any(k in evaluation for k in ("base", "pruned", "comparison")):
        return evaluation.get("base"), evaluation.get("pruned"), evaluation.get("comparison")
    return None, dict(evaluation), None


def retention_stderr(retention: float | None, pruned: float | None, pruned_se: float | None, base: float | None,
                     base_se: float | None) -> float | None:
    """Standard error of retention (a ratio of the two scores) by the delta method, the two scores' errors taken
    as independent: se(r) = r * sqrt((se_p / p)^2 + (se_b / b)^2). The same relative form holds for base / pruned."""
    if retention is None or None in (pruned, pruned_se, base, base_se) or not pruned or not base:
        return None
    return abs(retention) * math.sqrt((pruned_se / pruned) ** 2 + (base_se / base) ** 2)


def task_rows(base: Mapping | None, pruned: Mapping | None) -> list[ResultRow]:
    """One row per requested task (subtasks of a requested group stay in evaluation.json), primary metric only.
    Metric names are lm-eval's without the filter, which goes in its own field (older results wrote
    ``exact_match,strict-match`` as the name: split here)."""
    base_tasks = ((base or {}).get("lm_eval") or {}).get("tasks", {})
    pruned_tasks = ((pruned or {}).get("lm_eval") or {}).get("tasks", {})
    rows = []
    for task in list(dict.fromkeys([*pruned_tasks, *base_tasks])):
        p, b = pruned_tasks.get(task) or {}, base_tasks.get(task) or {}
        info = p or b
        if info.get("requested") is False:
            continue
        metrics_p, metrics_b = p.get("metrics", {}), b.get("metrics", {})
        key = info.get("primary_metric") or primary_metric(metrics_p or metrics_b)
        if key is None:
            continue
        metric, _, legacy_filter = key.partition(",")
        filt = info.get("filter") or legacy_filter or "none"
        pv, bv = metrics_p.get(key), metrics_b.get(key)
        retention = metric_retention(pv, bv, higher_is_better(info, key))
        stderr_key = f"{metric}_stderr" + (f",{legacy_filter}" if legacy_filter else "")
        se_p, se_b = _number(metrics_p.get(stderr_key)), _number(metrics_b.get(stderr_key))
        rows.append(ResultRow(
            task=task, metric=metric, base=bv, pruned=pv, retention=retention, stderr=se_p,
            version=info.get("version"), num_fewshot=info.get("num_fewshot"),
            num_samples=info.get("num_samples") if info.get("num_samples") is not None else b.get("num_samples"),
            dataset=info.get("dataset_path"), base_stderr=se_b,
            retention_stderr=retention_stderr(retention, _number(pv), se_p, _number(bv), se_b),
            filter=None if filt == "none" else filt, dataset_config=info.get("dataset_name"),
            split=info.get("split"), dataset_revision=info.get("dataset_revision"),
        ))
    return rows


def retention_summary(rows: Sequence[ResultRow], average: float | None) -> RetentionSummary | None:
    """``average`` (the comparison's mean retention) with the standard error of a mean of independent tasks,
    sqrt(sum se_i^2) / n, and the item count; the error is None when a task has none."""
    with_retention = [r for r in rows if r.retention is not None]
    if average is None or not with_retention:
        return None
    errors = [r.retention_stderr for r in with_retention]
    stderr = math.sqrt(sum(e * e for e in errors)) / len(errors) if None not in errors else None
    counts = [r.num_samples for r in with_retention]
    items = sum(counts) if all(isinstance(c, int) for c in counts) else None
    return RetentionSummary(mean=average, stderr=stderr, tasks=len(with_retention), num_items=items)


def pair(base: Mapping | None, pruned: Mapping | None, part: str, keys: Sequence[str]) -> dict[str, Any] | None:
    """``{key: {"base", "pruned", "ratio"}}`` for one part of the results (speed, memory); None if neither has it."""
    b, p = (base or {}).get(part), (pruned or {}).get(part)
    if not b and not p:
        return None
    out = {}
    for key in keys:
        bv, pv = (b or {}).get(key), (p or {}).get(key)
        ratio = pv / bv if isinstance(pv, (int, float)) and isinstance(bv, (int, float)) and bv else None
        out[key] = {"base": bv, "pruned": pv, "ratio": ratio}
    return out


def perplexity_row(base: Mapping | None, pruned: Mapping | None) -> dict[str, Any] | None:
    """Perplexity of both models (pruned / base as ratio), with the text and token count it was measured on."""
    b, p = (base or {}).get("perplexity") or {}, (pruned or {}).get("perplexity") or {}
    if not b and not p:
        return None
    bv, pv = _number(b.get("perplexity")), _number(p.get("perplexity"))
    side = p or b
    return {"base": bv, "pruned": pv, "ratio": pv / bv if pv is not None and bv else None,
            "tokens": side.get("tokens"), "source": side.get("source")}


# The memory rows of the card, in order, with what each measures (evaluation/probes.py measures them).
MEMORY_LABELS: dict[str, str] = {
    "parameter_bytes": "Weights (all parameters)",
    "routed_expert_bytes": "Routed-expert weights",
    "forward_peak_bytes": "One forward: peak above the weights",
    "peak_bytes": "GPU peak, weights included",
}


def memory_rows(base: Mapping | None, pruned: Mapping | None) -> dict[str, Any] | None:
    """Weight bytes and the forward's isolated peak, base vs pruned (:data:`MEMORY_LABELS`), rows neither side
    measured left out. Results written before the forward peak was isolated carry a whole-process RSS as
    ``peak_bytes``: only their weight bytes are shown."""
    memories = [m for m in ((base or {}).get("memory"), (pruned or {}).get("memory")) if m]
    if not memories:
        return None
    isolated = all("forward_peak_bytes" in m for m in memories)
    keys = list(MEMORY_LABELS) if isolated else ["parameter_bytes", "routed_expert_bytes"]
    rows = pair(base, pruned, "memory", keys) or {}
    return {k: v for k, v in rows.items() if v["base"] is not None or v["pruned"] is not None} or None


def human_bytes(memory: Mapping[str, Any] | None) -> dict[str, dict[str, str]] | None:
    """The memory pairs as "12.3 GiB" strings."""
    if not memory:
        return None

    def fmt(value):
        if not isinstance(value, (int, float)):
            return "n/a"
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or unit == "TiB":
                return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
            value /= 1024
        return str(value)

    return {k: {"base": fmt(v["base"]), "pruned": fmt(v["pruned"])} for k, v in memory.items()}


def _shots(row: ResultRow) -> str:
    return f"{row.num_fewshot if row.num_fewshot is not None else 0}-shot"


def model_index_results(inputs: CardInputs) -> list[EvalResult]:
    """``EvalResult`` rows for the front matter's model-index: the pruned model's values, unchanged, on the dataset
    lm-eval's task objects named (Hub id as ``type``, config, split, revision; the task name as the dataset's
    ``name``, and as its ``type`` too for local files, which have no Hub id); the metric without its filter, the
    filter as the metric's config."""
    out = []
    repo_id = inputs.repo_id
    for row in inputs.results:
        if row.pruned is None:
            continue
        hub = row.hub_dataset
        out.append(EvalResult(
            task_type="text-generation", task_name="Text Generation", dataset_type=hub or row.task,
            dataset_name=row.task, dataset_config=row.dataset_config if hub else None,
            dataset_split=row.split, dataset_revision=row.dataset_revision if hub else None,
            metric_type=row.metric, metric_value=row.pruned, metric_config=row.filter,
            metric_name=f"{row.metric} ({_shots(row)}{f', {row.filter}' if row.filter else ''})",
            source_name="diep_hub evaluation (lm-eval)" if repo_id else None,
            source_url=f"https://huggingface.co/{repo_id}" if repo_id else None,
        ))
    return out


def benchmark_of(row: ResultRow, benchmarks: Mapping[str, tuple[str, str]] | None = None) -> tuple[str, str] | None:
    """(Hub benchmark dataset id, task id) of a result row: the caller's ``benchmarks`` (by task name) first, then
    :data:`HUB_BENCHMARKS` by the dataset and config lm-eval used; None for a dataset the Hub has no benchmark of."""
    if benchmarks and row.task in benchmarks:
        return tuple(benchmarks[row.task])
    hub = row.hub_dataset
    if hub is None:
        return None
    task_id = HUB_BENCHMARKS.get((hub, row.dataset_config)) or HUB_BENCHMARKS.get((hub, None))
    return (hub, task_id) if task_id else None


def eval_result_entries(
    inputs: CardInputs, benchmarks: Mapping[str, tuple[str, str]] | None = None
) -> dict[str, list[EvalResultEntry]]:
    """``.eval_results/<task>.yaml`` entries for results on a Hub benchmark (:func:`benchmark_of`), with the date
    lm-eval ran, the dataset revision it loaded and, when the repo is known, the model repo as source."""
    settings = inputs.evaluation_settings or {}
    lm_eval_version = settings.get("lm_eval_version")
    repo_id = inputs.repo_id
    out: dict[str, list[EvalResultEntry]] = {}
    for row in inputs.results:
        found = benchmark_of(row, benchmarks) if row.pruned is not None else None
        if found is None:
            continue
        dataset_id, task_id = found
        version = f"lm-eval {lm_eval_version}" if lm_eval_version else "lm-eval"
        out[row.task] = [EvalResultEntry(
            dataset_id=dataset_id, task_id=task_id, value=row.pruned,
            dataset_revision=row.dataset_revision if dataset_id == row.hub_dataset else None,
            date=settings.get("date"),
            source_url=f"https://huggingface.co/{repo_id}" if repo_id else None,
            source_name=f"diep_hub evaluation ({version})" if repo_id else None,
            notes=f"{version} task {row.task}: {row.metric}{f' ({row.filter})' if row.filter else ''}, "
                  f"{_shots(row)}, after DiEP expert pruning",
        )]
    return out
