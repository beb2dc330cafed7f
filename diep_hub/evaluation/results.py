"""Evaluation results as JSON: every number travels with what is needed to trust and repeat it.

A result dict carries the library versions, the lm-eval task versions, the model's dtype and device and the seed,
so a number on a card can be traced to the run that produced it.
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

from ..checkpoint.layout import EVAL_FILE
from ..files import read_json_object
from ..jsonable import to_jsonable

RESULTS_FILE = EVAL_FILE  # the name diep_hub.evaluation exports; the checkpoint layout defines it
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


def save_results(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write results as indented JSON; a folder path gets ``evaluation.json`` inside it."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(results), indent=2) + "\n", encoding="utf-8")
    return path


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read results written by :func:`save_results` (a file or a checkpoint folder); a damaged file is a
    CorruptFileError naming it, its line and column."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    return read_json_object(path, RESULTS_FILE)
