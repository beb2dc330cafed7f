"""Base vs pruned: retention (pruned / base) for every shared metric, and the ratios that pruning is for."""

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
            retention = _ratio(pruned_value, base_value)
            metrics[metric] = {"base": base_value, "pruned": pruned_value, "retention": retention}
        primary = base_row.get("primary_metric")
        tasks[name] = {"primary_metric": primary, "metrics": metrics}
        if primary in metrics and metrics[primary]["retention"] is not None and base_row.get("requested", True):
            primaries.append((metrics[primary]["pruned"], metrics[primary]["base"]))
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
            for key in ("parameter_bytes", "routed_expert_bytes", "peak_bytes")
        }
    return out
