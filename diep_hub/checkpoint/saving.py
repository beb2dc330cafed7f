"""``save_pruned``: a pruned model, its tokenizer and companion files, saved atomically as one checkpoint.

The folder checks are :mod:`diep_hub.checkpoint.folders`, the staging/commit is
:mod:`diep_hub.checkpoint.atomic`, the ``diep_<family>`` and stock formats are :mod:`diep_hub.checkpoint.format`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from torch import nn

from ..errors import DiEPError
from ..modeling import REMOTE_CODE_FILES
from .atomic import atomic_directory
from .format import is_pruned, to_stock_model, uniform_expert_count

logger = logging.getLogger(__name__)


def save_pruned(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    tokenizer=None,
    stock_format: bool = False,
    overwrite: bool = False,
    extra_files: Mapping[str, str | bytes | dict] | None = None,
    before_commit: Callable[[Path], None] | None = None,
    max_shard_size: str | int = "5GB",
    fused_weights: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Save a pruned model (plus tokenizer and extra files) atomically.

    Args:
        model: a model returned by ``prune_experts`` or ``DiEPPruner.prune_model``.
        save_directory: the folder to create.
        tokenizer: saved beside the weights when given.
        stock_format: save as the stock family architecture (no remote code). Only possible when every layer
            keeps the same number of experts; checked before anything is written.
        overwrite: replace an existing non-empty folder (atomically) that looks like a checkpoint.
        extra_files: name -> text, bytes, or a dict written as JSON (reports, recipes, cards).
        before_commit: called with the staging folder after everything is written (used for checks).
        fused_weights: write experts as fused tensors (``experts.gate_up_proj``) instead of the family's original
            per-expert keys (``experts.3.w1.weight``); both load, the per-expert form is what the Hub's base
            checkpoints and most serving engines use.
        inputs: files the run read (recipe, calibration data...): the output folder may not contain them.

    Raises:
        DiEPError: the folder is refused (see :func:`check_output_folder`), another process saved there first,
            or writing failed (disk full...); nothing is left behind and a previous checkpoint is unchanged.
    """
    started = time.perf_counter()
    if stock_format and uniform_expert_count(model) is None:
        to_stock_model(model)  # raises the explanatory error
    if not stock_format and not is_pruned(model):
        raise DiEPError(
            f"{type(model).__name__} is not a pruned model; prune it with prune_experts/DiEPPruner first, or "
            "use model.save_pretrained for an unmodified model"
        )
    with atomic_directory(save_directory, overwrite=overwrite, inputs=inputs) as staging:
        to_save = to_stock_model(model) if stock_format else model
        to_save.save_pretrained(staging, max_shard_size=max_shard_size, save_original_format=not fused_weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, content in (extra_files or {}).items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Mapping):
                path.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n")
            elif isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        if not stock_format:
            missing = [name for name in REMOTE_CODE_FILES if not (staging / name).is_file()]
            if missing:
                raise DiEPError(f"remote code files {missing} were not written; the checkpoint would not load")
        if before_commit is not None:
            before_commit(staging)
    logger.info(
        "saved %s checkpoint to %s in %.1fs",
        "stock" if stock_format else "diep",
        save_directory,
        time.perf_counter() - started,
    )
    return Path(save_directory)


__all__ = ["save_pruned"]
