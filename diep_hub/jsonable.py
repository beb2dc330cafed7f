"""The one conversion of results to what ``json.dumps`` accepts: pruning reports, evaluation results, lm-eval
metrics all go through :func:`to_jsonable`, so a tensor, a numpy scalar, a path or a NaN reads the same in every
file diep_hub writes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def to_jsonable(value: Any) -> Any:
    """Tensors to lists, numpy scalars to numbers, tuples to lists, dict keys and paths to strings, non-finite
    floats to strings (``"nan"``, ``"inf"``: strict JSON has no NaN); anything else unknown to its ``str``."""
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return to_jsonable(value.item())
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


__all__ = ["to_jsonable"]
