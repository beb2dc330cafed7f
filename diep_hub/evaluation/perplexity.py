"""Perplexity on a text set: exp of the mean next-token negative log-likelihood over fixed-length windows.

Text comes through ``diep_hub.calibration.load_calibration_data`` (a Hub dataset, a local json/jsonl/parquet/txt
file, a ``datasets.Dataset`` or a list of strings), so base and pruned models see identical token windows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS
from torch import nn

from ..criteria.capture import input_device
from ..errors import ConfigError

logger = logging.getLogger(__name__)

SPEC_KEYS = ("source", "config_name", "split", "text_field", "num_samples", "seq_len")


@torch.inference_mode()
def perplexity_of_ids(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8) -> dict[str, Any]:
    """Perplexity of a model on token windows [N, L] (every window scored on its L-1 next-token predictions)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ConfigError(f"input_ids must be a LongTensor [num_samples, seq_len >= 2], got {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
    from ..calibration import check_token_ids, vocab_size_of

    vocab_size = vocab_size_of(model)
    if vocab_size is not None:
        check_token_ids(input_ids, vocab_size, "the perplexity token windows")
    device = input_device(model)
    total_nll = 0.0
    total_tokens = 0
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, input_ids.shape[0], batch_size), desc="perplexity", leave=False):
            batch = input_ids[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "mean_nll": mean, "tokens": total_tokens,
            "num_samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1])}


def perplexity(
    model: nn.Module,
    tokenizer,
    source: Any,
    *,
    num_samples: int = 64,
    seq_len: int = 2048,
    seed: int = 0,
    config_name: str | None = None,
    split: str = "test",
    text_field: str = "text",
    batch_size: int = 8,
) -> dict[str, Any]:
    """Perplexity on ``num_samples`` windows of ``seq_len`` tokens drawn (seeded) from ``source``."""
    from ..calibration import load_calibration_data, vocab_size_of

    input_ids = load_calibration_data(
        source, tokenizer, num_samples=num_samples, seq_len=seq_len, seed=seed, config_name=config_name,
        split=split, text_field=text_field, vocab_size=vocab_size_of(model), purpose="perplexity",
    )
    result = perplexity_of_ids(model, input_ids, batch_size=batch_size)
    result.update(source=source if isinstance(source, str) else f"<{type(source).__name__}>", split=split,
                  config_name=config_name, seed=seed)
    logger.info("perplexity %.4f on %d tokens of %s", result["perplexity"], result["tokens"], result["source"])
    return result


def perplexity_from_spec(model: nn.Module, tokenizer, spec: Any, *, seed: int = 0, batch_size: int = 8):
    """Perplexity from what a caller passed: token ids, a source (name, path, list, Dataset) or a dict of options.

    A dict takes the keys of :func:`perplexity` (``source`` required; ``config_name``, ``split``, ``text_field``,
    ``num_samples``, ``seq_len``); unknown keys are refused.
    """
    if isinstance(spec, torch.Tensor):
        return perplexity_of_ids(model, spec, batch_size=batch_size)
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown or "source" not in spec:
            raise ConfigError(f"perplexity options {dict(spec)!r}: need 'source'; allowed keys {list(SPEC_KEYS)}"
                              + (f"; unknown {unknown}" if unknown else ""))
        options = {k: v for k, v in spec.items() if k != "source" and v is not None}
        return perplexity(model, tokenizer, spec["source"], seed=seed, batch_size=batch_size, **options)
    return perplexity(model, tokenizer, spec, seed=seed, batch_size=batch_size)
