"""Evaluation results as JSON: every number travels with what is needed to trust and repeat it.

A result dict carries the library versions, the lm-eval task versions, the model's dtype and device and the seed,
so a number on a card can be traced to the run that produced it. lm-eval's own results dict (``lm_eval.raw``, what
its EvaluationTracker writes) travels with it in memory and is written beside evaluation.json, one file a model
(``lm_eval_results/base.json``, ``lm_eval_results/pruned.json``), so that lm-eval's tools read it as they know it.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint.layout import EVAL_FILE, LM_EVAL_RESULTS_DIR
from ..files import read_json_object
from ..jsonable import to_jsonable

RESULTS_FILE = EVAL_FILE  # the name diep_hub.evaluation exports; the checkpoint layout defines it
SIDES = ("base", "pruned")
SINGLE_SIDE = "model"  # the raw file's name for the results of one model (evaluate_model output)
TRACKED_PACKAGES = ("diep_hub", "torch", "transformers", "huggingface_hub", "datasets", "lm_eval", "evaluate",
                    "accelerate")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that influence results (None when one is not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            found[name] = version(name.replace("_", "-")) if name == "lm_eval" else version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def model_environment(model: nn.Module, seed: int) -> dict[str, Any]:
    """dtype, device, seed, class and model type of the evaluated model, plus package versions."""
    first = next(iter(model.parameters()), None)
    config = getattr(model, "config", None)
    return {
        "model_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "name_or_path", None) or None,
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "device": str(first.device) if first is not None else None,
        "seed": seed,
        "versions": package_versions(),
    }


def split_raw(results: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the results without lm-eval's raw dicts, ``{"base"|"pruned"|"model": raw dict}``), for ``{"base",
    "pruned", "comparison"}`` or one model's results."""
    two_sided = any(k in results for k in (*SIDES, "comparison"))
    sides = {side: results.get(side) for side in SIDES} if two_sided else {SINGLE_SIDE: results}
    slim = dict(results)
    raws: dict[str, Any] = {}
    for side, part in sides.items():
        lm_eval = (part or {}).get("lm_eval") if isinstance(part, Mapping) else None
        if not isinstance(lm_eval, Mapping) or "raw" not in lm_eval:
            continue
        raws[side] = lm_eval["raw"]
        kept = {**part, "lm_eval": {k: v for k, v in lm_eval.items() if k != "raw"}}
        if two_sided:
            slim[side] = kept
        else:
            slim = kept
    return slim, raws


def raw_results_path(side: str) -> str:
    """Where lm-eval's results of one model go, relative to the folder of evaluation.json."""
    return f"{LM_EVAL_RESULTS_DIR}/{side}.json"


def evaluation_files(results: Mapping[str, Any]) -> dict[str, Any]:
    """``{relative path: JSON-ready data}``: evaluation.json without lm-eval's raw dicts, and each raw dict in
    ``lm_eval_results/<side>.json`` (for a checkpoint save's ``extra_files``)."""
    slim, raws = split_raw(results)
    files: dict[str, Any] = {EVAL_FILE: to_jsonable(slim)}
    files.update({raw_results_path(side): to_jsonable(raw) for side, raw in raws.items()})
    return files


def save_results(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write results as indented JSON, lm-eval's raw results beside them (:func:`evaluation_files`); a folder path
    gets ``evaluation.json`` inside it. Returns the path of evaluation.json."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    files = evaluation_files(results)
    files[path.name] = files.pop(EVAL_FILE)
    for name, data in files.items():
        target = path.parent / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read results written by :func:`save_results` (a file or a checkpoint folder); a damaged file is a
    CorruptFileError naming it, its line and column."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    return read_json_object(path, RESULTS_FILE)
