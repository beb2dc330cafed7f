"""``evaluate_model``: one call that measures a model the way the card reports it (tasks, perplexity, speed,
memory), with the environment needed to trust the numbers. Run it on the base and on the pruned model, then
``compare`` the two.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .lm_eval_runner import DEFAULT_TASKS, _check_common, run_lm_eval, validate_tasks
from .perplexity import perplexity_from_spec
from .probes import measure_memory, measure_speed
from .results import model_environment

logger = logging.getLogger(__name__)


def evaluate_model(
    model: nn.Module,
    tokenizer,
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    perplexity_data: Any = None,
    perplexity: Any = None,
    speed: bool | Mapping[str, Any] = True,
    memory: bool | Mapping[str, Any] = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate one model; every part is optional and checked before any of them runs.

    Args:
        tasks: lm-eval task names (default: the paper's zero-shot set); an empty list skips lm-eval.
        include_path: a folder of local lm-eval task YAML files (offline tasks).
        limit, batch_size, num_fewshot: passed to lm-eval.
        perplexity_data: token ids [N, L], a text source (Hub name, local file, list of strings, Dataset), or a
            dict with ``source`` and :func:`~diep_hub.evaluation.perplexity.perplexity` options; None skips it.
        perplexity: the same, under the name the recipe runner uses (give one of the two).
        speed, memory: True to run the probe with defaults, a dict of probe options, or False.
        seed: seeds lm-eval, the perplexity windows and the probe prompts.

    Returns:
        ``{"lm_eval": ..., "perplexity": ..., "speed": ..., "memory": ..., "environment": ..., "seconds": ...}``
        (absent parts are None).
    """
    if perplexity_data is not None and perplexity is not None:
        raise ConfigError("give perplexity_data or perplexity, not both (they are the same option)")
    ppl_spec = perplexity_data if perplexity_data is not None else perplexity
    tasks = validate_tasks(tasks)
    _check_common(limit, batch_size, num_fewshot, seed)
    for name, value in (("speed", speed), ("memory", memory)):
        if not isinstance(value, (bool, Mapping)):
            raise ConfigError(f"{name}={value!r} must be True, False or a dict of probe options")
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ConfigError(f"model must be a transformers model, got {type(model).__name__}")
    started = time.perf_counter()
    out: dict[str, Any] = {"lm_eval": None, "perplexity": None, "speed": None, "memory": None}
    if tasks:
        out["lm_eval"] = run_lm_eval(model, tokenizer, tasks, include_path=include_path, limit=limit,
                                     batch_size=batch_size, num_fewshot=num_fewshot, seed=seed)
    if ppl_spec is not None:
        out["perplexity"] = perplexity_from_spec(model, tokenizer, ppl_spec, seed=seed, batch_size=batch_size)
    if memory:
        out["memory"] = measure_memory(model, seed=seed, **(dict(memory) if isinstance(memory, Mapping) else {}))
    if speed:
        out["speed"] = measure_speed(model, seed=seed, **(dict(speed) if isinstance(speed, Mapping) else {}))
    out["environment"] = model_environment(model, seed)
    out["environment"]["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out
