"""The card's evaluation tables: base vs pruned per task (with standard errors and item counts), the retention
summary, perplexity / speed / memory pairs, and the Hub's two result formats (model-index ``EvalResult`` rows in
the front matter, ``.eval_results/*.yaml`` entries for benchmarks the Hub tracks).

Everything here is computed from evaluation results (``evaluate_model`` output, or ``{"base", "pruned",
"comparison"}``); the template only formats it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, EvalResultEntry

from ..evaluation.comparison import higher_is_better, metric_retention
from ..evaluation.lm_eval_runner import primary_metric

if TYPE_CHECKING:
    from .inputs import CardInputs

# lm-eval task -> (Hub benchmark dataset id, task id) for `.eval_results/` entries. Only tasks listed here (or
# passed as ``benchmarks=``) get an entry: a made-up dataset id would not link to any leaderboard.
HUB_BENCHMARKS: dict[str, tuple[str, str]] = {
    "mmlu": ("cais/mmlu", "mmlu"),
    "mmlu_pro": ("TIGER-Lab/MMLU-Pro", "mmlu_pro"),
    "gpqa_diamond_zeroshot": ("Idavidrein/gpqa", "gpqa_diamond"),
    "boolq": ("google/boolq", "boolq"),
    "openbookqa": ("allenai/openbookqa", "openbookqa"),
    "rte": ("nyu-mll/glue", "rte"),
    "hellaswag": ("Rowan/hellaswag", "hellaswag"),
    "arc_challenge": ("allenai/ai2_arc", "arc_challenge"),
    "arc_easy": ("allenai/ai2_arc", "arc_easy"),
    "winogrande": ("allenai/winogrande", "winogrande"),
    "gsm8k": ("openai/gsm8k", "gsm8k"),
    "piqa": ("ybisk/piqa", "piqa"),
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
    dataset: str | None = None
    base_stderr: float | None = None
    retention_stderr: float | None = None


@dataclass
class RetentionSummary:
    """Mean retention over the tasks, its standard error and how many items it rests on (no single headline)."""

    mean: float
    stderr: float | None
    tasks: int
    num_items: int | None


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
    """One row per requested task (subtasks of a requested group stay in evaluation.json), primary metric only."""
    base_tasks = ((base or {}).get("lm_eval") or {}).get("tasks", {})
    pruned_tasks = ((pruned or {}).get("lm_eval") or {}).get("tasks", {})
    rows = []
    for task in list(dict.fromkeys([*pruned_tasks, *base_tasks])):
        p, b = pruned_tasks.get(task) or {}, base_tasks.get(task) or {}
        info = p or b
        if info.get("requested") is False:
            continue
        metrics_p, metrics_b = p.get("metrics", {}), b.get("metrics", {})
        metric = info.get("primary_metric") or primary_metric(metrics_p or metrics_b)
        if metric is None:
            continue
        pv, bv = metrics_p.get(metric), metrics_b.get(metric)
        retention = metric_retention(pv, bv, higher_is_better(info, metric))
        se_p, se_b = _number(metrics_p.get(f"{metric}_stderr")), _number(metrics_b.get(f"{metric}_stderr"))
        rows.append(ResultRow(
            task=task, metric=metric, base=bv, pruned=pv, retention=retention, stderr=se_p,
            version=info.get("version"), num_fewshot=info.get("num_fewshot"),
            num_samples=info.get("num_samples") if info.get("num_samples") is not None else b.get("num_samples"),
            dataset=info.get("dataset_path"), base_stderr=se_b,
            retention_stderr=retention_stderr(retention, _number(pv), se_p, _number(bv), se_b),
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


def model_index_results(inputs: CardInputs) -> list[EvalResult]:
    """``EvalResult`` rows for the front matter's model-index: the pruned model's values, unchanged."""
    out = []
    repo_id = inputs.repo_id
    for row in inputs.results:
        if row.pruned is None:
            continue
        dataset_id = HUB_BENCHMARKS.get(row.task, (row.task, row.task))[0]
        out.append(EvalResult(
            task_type="text-generation", task_name="Text Generation", dataset_type=dataset_id,
            dataset_name=row.task, metric_type=row.metric, metric_value=row.pruned,
            metric_name=f"{row.metric} ({row.num_fewshot if row.num_fewshot is not None else 0}-shot)",
            source_name="diep_hub evaluation (lm-eval)" if repo_id else None,
            source_url=f"https://huggingface.co/{repo_id}" if repo_id else None,
        ))
    return out


def eval_result_entries(
    inputs: CardInputs, benchmarks: Mapping[str, tuple[str, str]] | None = None
) -> dict[str, list[EvalResultEntry]]:
    """``.eval_results/<task>.yaml`` entries for tasks that map to a Hub benchmark dataset."""
    table = {**HUB_BENCHMARKS, **(benchmarks or {})}
    lm_eval_version = (inputs.evaluation_settings or {}).get("lm_eval_version")
    out: dict[str, list[EvalResultEntry]] = {}
    for row in inputs.results:
        if row.pruned is None or row.task not in table:
            continue
        dataset_id, task_id = table[row.task]
        shots = row.num_fewshot if row.num_fewshot is not None else 0
        out[row.task] = [EvalResultEntry(
            dataset_id=dataset_id, task_id=task_id, value=row.pruned,
            notes=f"lm-eval {lm_eval_version or ''} {row.metric}, {shots}-shot, after DiEP expert pruning".replace(
                "  ", " "),
        )]
    return out
