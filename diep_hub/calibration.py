"""Calibration tokens for scoring and search: text from anywhere ``datasets`` reads, packed into fixed windows.

The paper (and NAEE, REAP) calibrate on 128 sequences of C4 English ("allenai/c4", config "en"); 2048 tokens a
sequence is NAEE's and REAP's length. Any text source works:

- a Hub dataset name (config, split, text field), streamed by default since C4 is hundreds of GB;
- a local file (.json, .jsonl, .parquet, .txt, optionally compressed .gz/.bz2/.xz/.zst) via ``datasets``' own
  json / parquet / text builders (one line a document for .txt);
- a ``datasets.Dataset`` / ``IterableDataset`` / ``DatasetDict`` already in memory;
- a list of strings.

Packing: documents are shuffled with the seed, tokenised without special tokens, and concatenated with the
tokenizer's EOS between documents until num_samples * seq_len tokens are collected; a seeded offset inside the
surplus of the last document is dropped from the front, and the stream is cut into num_samples consecutive
windows of seq_len tokens. Same seed, same tensor; a different seed gives a different document order.

Sources (and the checks of a local file before ``datasets`` reads it) are in ``diep_hub.calibration_sources``;
their public names are importable from here too. With ``vocab_size`` (the pruner and perplexity pass the model's),
token ids the model has no embedding for (a tokenizer of another model) are refused before any forward pass.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS

from .calibration_sources import DEFAULT_DATASET, check_text_file, hub_offline, read_documents
from .errors import ConfigError

logger = logging.getLogger(__name__)

#: documents tokenised per tokenizer call
TOKENIZE_BATCH = 64


def load_calibration_data(
    source: Any,
    tokenizer,
    *,
    num_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    config_name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    streaming: bool | None = None,
    progress: bool = True,
    vocab_size: int | None = None,
    purpose: str = "calibration",
) -> torch.Tensor:
    """Calibration token windows, ``LongTensor [num_samples, seq_len]``.

    Args:
        source: Hub dataset name, local file path, ``datasets`` dataset, or list of strings (see module doc).
        tokenizer: a transformers tokenizer (its EOS separates documents).
        num_samples: number of windows.
        seq_len: tokens a window.
        seed: shuffles documents and picks the offset; same seed, same tensor.
        config_name: Hub dataset config ("en" by default for allenai/c4).
        split: split of a Hub dataset or DatasetDict (a local file is a single "train" split).
        text_field: column holding the text (a .txt file always uses "text").
        streaming: stream instead of downloading; default True for Hub names, False otherwise.
        progress: show a tqdm bar while tokenising.
        vocab_size: the model's vocabulary size; a token id at or above it (a tokenizer of another model) is
            refused here rather than as an IndexError inside the model's forward pass.
        purpose: what the text is for, in messages ("calibration", "perplexity").

    Raises:
        ConfigError: bad arguments, an unknown file type, a missing text column, an empty file, too little
            text, token ids outside the model's vocabulary, or a Hub name while offline.
        CorruptFileError: a local file that is not UTF-8, a damaged compressed file, or malformed JSON (the
            message names the file and the line).
    """
    _check_positive_int("num_samples", num_samples)
    _check_positive_int("seq_len", seq_len)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an integer")
    if not callable(tokenizer):
        raise ConfigError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    needed = num_samples * seq_len
    rng = random.Random(seed)
    documents, description = read_documents(source, seed, config_name, split, text_field, streaming, rng, purpose)
    tokens = _pack(documents, tokenizer, needed, description, progress=progress)
    if len(tokens) < needed:
        raise ConfigError(
            f"{purpose} source {description} has {len(tokens):,} tokens, but num_samples={num_samples} x "
            f"seq_len={seq_len} needs {needed:,}; pass more text or lower num_samples / seq_len"
        )
    surplus = len(tokens) - needed
    offset = rng.randint(0, surplus) if surplus else 0
    window = torch.tensor(tokens[offset : offset + needed], dtype=torch.long)
    if vocab_size is not None:
        check_token_ids(window, vocab_size, f"{purpose} text from {description}")
    logger.info("calibration data: %d x %d tokens from %s (seed %d)", num_samples, seq_len, description, seed)
    return window.reshape(num_samples, seq_len)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1")

# ----------------------------------------------------------------------------------------- vocabulary checks


def vocab_size_of(model) -> int | None:
    """Rows of the model's input embedding (``config.vocab_size`` when it has none): ids must stay below it."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    rows = getattr(embedding, "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, description: str = "the text") -> None:
    """Refuse token ids the model has no embedding for: the tokenizer belongs to another model."""
    if input_ids.numel() == 0:
        return
    largest, smallest = int(input_ids.max()), int(input_ids.min())
    if largest >= vocab_size or smallest < 0:
        bad = largest if largest >= vocab_size else smallest
        count = int(((input_ids >= vocab_size) | (input_ids < 0)).sum())
        raise ConfigError(
            f"the tokenizer gives token id {bad} ({count} token(s) out of range) on {description}, but the model's "
            f"vocabulary size is {vocab_size} (ids 0..{vocab_size - 1}): the tokenizer does not belong to this "
            "model; load the tokenizer of the same checkpoint"
        )


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        if item.strip():
            batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _pack(documents: Iterable[str], tokenizer, needed: int, description: str, progress: bool = True) -> list[int]:
    """Tokenise documents until ``needed`` tokens are collected, EOS between documents."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        logger.warning("tokenizer has no EOS token: calibration documents are concatenated without a separator")
    tokens: list[int] = []
    bar = tqdm(total=needed, desc="tokenising calibration data", unit="tok", disable=not progress)
    try:
        for batch in _batched(documents, TOKENIZE_BATCH):
            encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            for ids in encoded:
                if tokens and eos is not None:
                    tokens.append(eos)
                tokens.extend(ids)
            bar.update(min(len(tokens), needed) - bar.n)
            if len(tokens) >= needed:
                break
    finally:
        bar.close()
    return tokens


__all__: Sequence[str] = [
    "DEFAULT_DATASET",
    "check_text_file",
    "check_token_ids",
    "hub_offline",
    "load_calibration_data",
    "vocab_size_of",
]
