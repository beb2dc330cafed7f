"""Base vs pruned: retention for every shared metric, and the ratios that pruning is for.

Retention is pruned / base for metrics where higher is better (accuracy) and base / pruned where lower is better
(lm-eval's ``higher_is_better: false``, e.g. word_perplexity), so that 1.0 always means "unchanged" and less
than 1.0 always means "worse".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError


def _ratio(pruned: Any, base: Any) -> float | None:
    if not isinstance(pruned, (int, float)) or not isinstance(base, (int, float)) or isinstance(base, bool):
        return None
    if base == 0:
        return None
    return float(pruned) / float(base)


def metric_retention(pruned: Any, base: Any, higher_is_better: bool = True) -> float | None:
    """pruned / base, or base / pruned for a lower-is-better metric; None when either is missing or zero."""
    if higher_is_better:
        return _ratio(pruned, base)
    return _ratio(base, pruned) if isinstance(pruned, (int, float)) and pruned != 0 else None


def higher_is_better(task_row: Mapping[str, Any], metric: str) -> bool:
    """lm-eval's direction of a task metric (recorded by run_lm_eval); higher is better unless it says otherwise."""
    return (task_row.get("higher_is_better") or {}).get(metric) is not False


def compare(base_results: Mapping[str, Any], pruned_results: Mapping[str, Any]) -> dict[str, Any]:
    """Retention of every task metric both results share (retention = pruned / base), plus perplexity, speed
    and memory ratios. Standard errors are not compared. Average retention is over the tasks' primary metrics.
    """
    if not isinstance(base_results, Mapping) or not isinstance(pruned_results, Mapping):
        raise ConfigError("compare(base_results, pruned_results) takes two dicts returned by evaluate_model")
    base_tasks = (base_results.get("lm_eval") or {}).get("tasks", {})
    pruned_tasks = (pruned_results.get("lm_eval") or {}).get("tasks", {})
    tasks: dict[str, Any] = {}
    primaries = []
    for name, base_row in base_tasks.items():
        pruned_row = pruned_tasks.get(name)
        if pruned_row is None:
            continue
        metrics = {}
        for metric, base_value in base_row.get("metrics", {}).items():
            if "_stderr" in metric or metric not in pruned_row.get("metrics", {}):
                continue
            pruned_value = pruned_row["metrics"][metric]
            retention = metric_retention(pruned_value, base_value, higher_is_better(base_row, metric))
            metrics[metric] = {"base": base_value, "pruned": pruned_value, "retention": retention}
        primary = base_row.get("primary_metric")
        tasks[name] = {"primary_metric": primary, "metrics": metrics}
        if primary in metrics and metrics[primary]["retention"] is not None and base_row.get("requested", True):
            pair = (metrics[primary]["pruned"], metrics[primary]["base"])
            primaries.append(pair if higher_is_better(base_row, primary) else pair[::-1])
    out: dict[str, Any] = {"tasks": tasks, "average_retention": None}
    if primaries:
        # Same definition as the packaged evaluate metric (diep_hub/evaluation/retention.py).
        from .retention import retention_ratios

        ratios = retention_ratios([p for p, _ in primaries], [b for _, b in primaries])
        out["average_retention"] = sum(ratios) / len(ratios)
    bp, pp = base_results.get("perplexity"), pruned_results.get("perplexity")
    if isinstance(bp, Mapping) and isinstance(pp, Mapping):
        out["perplexity"] = {"base": bp.get("perplexity"), "pruned": pp.get("perplexity"),
                             "ratio": _ratio(pp.get("perplexity"), bp.get("perplexity"))}
    bs, ps = base_results.get("speed"), pruned_results.get("speed")
    if isinstance(bs, Mapping) and isinstance(ps, Mapping):
        out["speed"] = {
            key: {"base": bs.get(key), "pruned": ps.get(key), "ratio": _ratio(ps.get(key), bs.get(key))}
            for key in ("prefill_tokens_per_s", "decode_tokens_per_s")
        }
    bm, pm = base_results.get("memory"), pruned_results.get("memory")
    if isinstance(bm, Mapping) and isinstance(pm, Mapping):
        out["memory"] = {
            key: {"base": bm.get(key), "pruned": pm.get(key), "ratio": _ratio(pm.get(key), bm.get(key))}
            for key in ("parameter_bytes", "routed_expert_bytes", "forward_peak_bytes", "peak_bytes")
        }
    return out
