"""Atomic saving of pruned checkpoints.

Everything is written into a temporary folder beside the target and renamed into place at the end, so an
exception (disk full, a bad tokenizer, Ctrl-C) never leaves a half-written checkpoint where a user, a CI upload
step or ``from_pretrained`` could pick it up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from .errors import DiEPError
from .modeling import REMOTE_CODE_FILES
from .pruned_format import is_pruned, to_stock_model, uniform_expert_count

logger = logging.getLogger(__name__)


@contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary folder that replaces ``target`` only if the block finishes without an exception."""
    target = Path(target).resolve()
    if target.exists() and not target.is_dir():
        raise DiEPError(f"{target} exists and is a file; give a folder path")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise DiEPError(f"{target} already exists and is not empty; pass overwrite=True or choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


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
) -> Path:
    """Save a pruned model (plus tokenizer and extra files) atomically.

    Args:
        model: a model returned by ``prune_experts`` or ``DiEPPruner.prune_model``.
        save_directory: the folder to create.
        tokenizer: saved beside the weights when given.
        stock_format: save as the stock family architecture (no remote code). Only possible when every layer
            keeps the same number of experts; checked before anything is written.
        overwrite: replace an existing non-empty folder (atomically).
        extra_files: name -> text, bytes, or a dict written as JSON (reports, recipes, cards).
        before_commit: called with the staging folder after everything is written (used for checks).
        fused_weights: write experts as fused tensors (``experts.gate_up_proj``) instead of the family's original
            per-expert keys (``experts.3.w1.weight``); both load, the per-expert form is what the Hub's base
            checkpoints and most serving engines use.
    """
    if stock_format and uniform_expert_count(model) is None:
        to_stock_model(model)  # raises the explanatory error
    if not stock_format and not is_pruned(model):
        raise DiEPError(
            f"{type(model).__name__} is not a pruned model; prune it with prune_experts/DiEPPruner first, or "
            "use model.save_pretrained for an unmodified model"
        )
    with atomic_directory(save_directory, overwrite=overwrite) as staging:
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
    logger.info("saved %s checkpoint to %s", "stock" if stock_format else "diep", save_directory)
    return Path(save_directory)
