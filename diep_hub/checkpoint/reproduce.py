"""Reproducing a checkpoint: re-run the recipe it records and compare kept experts, weights, scores and results.

It sits above the run (it calls :func:`~diep_hub.runner.run_recipe`): nothing else in diep_hub.checkpoint imports
it, so the run can save checkpoints without importing itself back. The comparisons leave out what measures the machine
rather than the model (timings, memory, versions).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import DiEPError
from ..evaluation.results import split_raw
from ..recipe import load_recipe
from ..runner import run_recipe
from .inspect import local_folder, read_checkpoint_metadata
from .layout import CONFIG_FILE, RECIPE_FILE
from .report import PruningReport


def reproduce(
    repo_or_dir: str | os.PathLike, *, revision: str | None = None, atol: float = 1e-5, evaluate_scores: bool = True
) -> dict[str, Any]:
    """Re-run the recipe recorded in a checkpoint and compare: kept experts, weights, importance and eval scores.

    Returns a dict with ``match`` (bool) and one entry per check, each with ``match`` and what differed.
    """
    folder = local_folder(repo_or_dir, revision=revision, weights=True)
    recipe_file = folder / RECIPE_FILE
    if not recipe_file.exists():
        raise DiEPError(f"{repo_or_dir}: no {RECIPE_FILE} -> only checkpoints made by `diep-hub run` can be reproduced")
    if not (folder / CONFIG_FILE).is_file():
        raise DiEPError(f"{repo_or_dir}: no {CONFIG_FILE} -> not a model checkpoint")
    recorded = read_checkpoint_metadata(folder)  # a damaged file is named before the hour-long re-run, not after
    recipe = load_recipe(recipe_file)
    recorded_config = recorded["config"]
    recorded_report = recorded["report"] or PruningReport()
    recorded_eval = recorded["evaluation"] or {}
    if not evaluate_scores:
        recipe.evaluation.enabled = False
    recipe.publish.push = False

    with tempfile.TemporaryDirectory(prefix="diep-hub-reproduce-") as tmp:
        rerun_dir = Path(tmp) / "rerun"
        summary = run_recipe(recipe, output_dir=rerun_dir, push=False)
        rerun = read_checkpoint_metadata(rerun_dir)
        new_config, new_report = rerun["config"], rerun["report"] or PruningReport()
        checks = {
            "kept_experts": _compare_kept(recorded_config, new_config, recorded_report, new_report),
            "weights": _compare_weights(folder, rerun_dir, atol=atol),
            "expert_scores": _compare_numbers(recorded_report.scores, new_report.scores, atol=1e-4),
        }
        if recorded_config.get("diep_skipping") or new_config.get("diep_skipping"):
            checks["skipping_tables"] = _compare_numbers(
                recorded_config.get("diep_skipping") or {}, new_config.get("diep_skipping") or {}, atol=1e-4
            )
        if recorded_report.merging or new_report.merging:
            checks["merging"] = _compare_numbers(recorded_report.merging or {}, new_report.merging or {}, atol=1e-4)
        if recorded_report.recalibration or new_report.recalibration:
            timing = ("seconds",)  # the machine's speed, not the model's
            checks["recalibration"] = _compare_numbers(
                {k: v for k, v in (recorded_report.recalibration or {}).items() if k not in timing},
                {k: v for k, v in (new_report.recalibration or {}).items() if k not in timing},
                atol=1e-4,
            )
        if evaluate_scores and recorded_eval:
            checks["evaluation"] = _compare_numbers(
                # lm-eval's raw dicts (its config, timings, sizes) are not results: compare what evaluation.json holds
                _eval_numbers(split_raw(recorded_eval)[0]), _eval_numbers(split_raw(summary["evaluation"])[0]),
                atol=1e-4
            )
    return {"source": str(repo_or_dir), "match": all(c["match"] for c in checks.values()), "checks": checks}


def _kept_ids(config: dict, report: PruningReport) -> list | None:
    """Kept original ids per decoder layer: from config.json, or (stock-format checkpoints, whose config has no
    per-layer fields) from the pruning report's ``kept_original_ids``."""
    if config.get("kept_expert_ids") is not None:
        return config["kept_expert_ids"]
    by_layer = report.kept_original_ids
    if not by_layer:
        return None
    layers = int(config.get("num_hidden_layers") or 1 + max(by_layer))
    return [by_layer.get(i) for i in range(layers)]


def _compare_kept(old: dict, new: dict, old_report: PruningReport | None = None,
                  new_report: PruningReport | None = None):
    a, b = _kept_ids(old, old_report or PruningReport()), _kept_ids(new, new_report or PruningReport())
    diffs = [
        {"layer": i, "recorded": x, "reproduced": y}
        for i, (x, y) in enumerate(zip(a or [], b or []))
        if x != y
    ]
    if len(a or []) != len(b or []):
        diffs.append({"layer": "count", "recorded": len(a or []), "reproduced": len(b or [])})
    return {"match": not diffs and a is not None, "differences": diffs}


def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _compare_weights(old: Path, new: Path, *, atol: float) -> dict[str, Any]:
    a, b = _load_tensors(old), _load_tensors(new)
    if not a:
        return {"match": False, "differences": [f"no safetensors weights in {old}"]}
    diffs = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            diffs.append({"tensor": name, "problem": "missing in " + ("recorded" if name not in a else "reproduced")})
        elif a[name].shape != b[name].shape:
            diffs.append({"tensor": name, "problem": f"shape {list(a[name].shape)} vs {list(b[name].shape)}"})
        else:
            delta = (a[name].float() - b[name].float()).abs().max().item() if a[name].numel() else 0.0
            if delta > atol:
                diffs.append({"tensor": name, "max_abs_diff": delta})
    return {"match": not diffs, "tensors": len(a), "differences": diffs[:20], "num_differences": len(diffs)}


def _flatten(value: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}{i}."))
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int | float):
        out[prefix.rstrip(".")] = float(value)
    return out


# Keys whose values are measurements of the machine, not of the model: never compared.
_VOLATILE = re.compile(
    r"(time|seconds|tokens_per_s|throughput|speed|peak|memory|date|version|environment)", re.IGNORECASE
)


def _eval_numbers(results: dict) -> dict[str, float]:
    return {k: v for k, v in _flatten(results).items() if not _VOLATILE.search(k)}


def _compare_numbers(old: Any, new: Any, *, atol: float) -> dict[str, Any]:
    if old is None:
        return {"match": True, "note": "nothing recorded to compare"}
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        same = x is not None and y is not None and (
            math.isclose(x, y, abs_tol=atol, rel_tol=1e-4) or (math.isnan(x) and math.isnan(y))
        )
        if not same:
            diffs.append({"key": key, "recorded": x, "reproduced": y})
    return {"match": not diffs, "compared": len(a), "differences": diffs[:20], "num_differences": len(diffs)}
