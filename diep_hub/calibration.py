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

Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or the Hub unreachable) a Hub name fails at once with a message
saying how to pass local data instead; when ``datasets`` itself is in offline mode a dataset already in the
local cache is still used (that lookup does not touch the network).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "allenai/c4"
#: default config for datasets that require one
DEFAULT_CONFIGS = {"allenai/c4": "en", "c4": "en"}
#: suffix -> ``datasets`` builder for local files
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zstd")
#: documents tokenised per tokenizer call
TOKENIZE_BATCH = 64
#: shuffle buffer for streamed datasets
STREAM_SHUFFLE_BUFFER = 10_000

_TRUE = {"1", "ON", "YES", "TRUE"}

LOCAL_DATA_HINT = (
    "pass local data instead: a file path (.json, .jsonl, .parquet or .txt), a datasets.Dataset, or a list of "
    "strings, e.g. load_calibration_data('calib.jsonl', tokenizer) or load_calibration_data(['text one', ...], "
    "tokenizer)"
)


def hub_offline() -> bool:
    """Whether the environment (read now, not at import) or huggingface_hub says the Hub is off limits."""
    if any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


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

    Raises:
        ConfigError: bad arguments, an unknown file type, a missing text column, too little text, or a Hub name
            while offline.
    """
    _check_positive_int("num_samples", num_samples)
    _check_positive_int("seq_len", seq_len)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an integer")
    if not callable(tokenizer):
        raise ConfigError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    needed = num_samples * seq_len
    rng = random.Random(seed)
    documents, description = _documents(source, seed, config_name, split, text_field, streaming, rng)
    tokens = _pack(documents, tokenizer, needed, description, progress=progress)
    if len(tokens) < needed:
        raise ConfigError(
            f"calibration source {description} has {len(tokens):,} tokens, but num_samples={num_samples} x "
            f"seq_len={seq_len} needs {needed:,}; pass more text or lower num_samples / seq_len"
        )
    surplus = len(tokens) - needed
    offset = rng.randint(0, surplus) if surplus else 0
    window = torch.tensor(tokens[offset : offset + needed], dtype=torch.long)
    logger.info("calibration data: %d x %d tokens from %s (seed %d)", num_samples, seq_len, description, seed)
    return window.reshape(num_samples, seq_len)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1")


def _documents(source, seed, config_name, split, text_field, streaming, rng) -> tuple[Iterable[str], str]:
    """Shuffled documents of any supported source, and a short description for messages."""
    import datasets

    if isinstance(source, (list, tuple)):
        bad = [i for i, doc in enumerate(source) if not isinstance(doc, str)]
        if bad:
            raise ConfigError(f"a list source must hold strings; items {bad[:5]} are not")
        order = list(range(len(source)))
        rng.shuffle(order)
        return (source[i] for i in order), f"a list of {len(source)} strings"
    if isinstance(source, datasets.DatasetDict | datasets.IterableDatasetDict):
        if split not in source:
            raise ConfigError(f"split={split!r} is not in the DatasetDict; available: {sorted(source)}")
        source = source[split]
    if isinstance(source, datasets.Dataset | datasets.IterableDataset):
        return _from_dataset(source, seed, text_field, "a datasets object"), "a datasets object"
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _looks_local(source)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"calibration file {str(path)!r} does not exist (or is not a file)")
        builder = _builder_for(path)
        field = "text" if builder == "text" else text_field
        dataset = datasets.load_dataset(
            builder, data_files={"train": str(path)}, split="train", streaming=bool(streaming)
        )
        return _from_dataset(dataset, seed, field, str(path)), str(path)
    if isinstance(source, str) and source:
        return _from_hub(source, seed, config_name, split, text_field, streaming)
    raise ConfigError(
        f"calibration source {source!r} is not supported; give a Hub dataset name, a file path (.json, .jsonl, "
        ".parquet, .txt), a datasets.Dataset, or a list of strings"
    )


def _looks_local(source: str) -> bool:
    """A string names a local file when it exists, or looks like a path (separator start, known suffix)."""
    if os.path.exists(source) or source.startswith((".", "/", "~")):
        return True
    suffixes = [s.lower() for s in Path(source).suffixes]
    return any(s in LOCAL_BUILDERS for s in suffixes)


def _builder_for(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes.pop()
    builder = LOCAL_BUILDERS.get(suffixes[-1]) if suffixes else None
    if builder is None:
        raise ConfigError(
            f"calibration file {str(path)!r} has an unsupported type; use one of {sorted(LOCAL_BUILDERS)} "
            f"(optionally compressed: {', '.join(COMPRESSION_SUFFIXES)})"
        )
    return builder


def _from_hub(name, seed, config_name, split, text_field, streaming) -> tuple[Iterable[str], str]:
    import datasets

    config_name = config_name if config_name is not None else DEFAULT_CONFIGS.get(name)
    description = f"Hub dataset {name!r}" + (f" (config {config_name!r}, split {split!r})" if config_name else "")
    if hub_offline():
        if not datasets.config.HF_HUB_OFFLINE:
            # The offline switch was set after `datasets` was imported: it would still try the network (and
            # retry for ~20 s), so refuse here.
            raise ConfigError(
                f"{description} cannot be loaded: the Hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
                f"is set); {LOCAL_DATA_HINT}"
            )
        streaming = False  # only a cached, fully prepared dataset can be read offline
    elif streaming is None:
        streaming = True
    try:
        dataset = datasets.load_dataset(name, config_name, split=split, streaming=streaming)
    except (ConnectionError, TimeoutError, datasets.exceptions.DatasetNotFoundError) as error:
        offline = "the Hub is offline; " if hub_offline() else ""
        raise ConfigError(
            f"{description} cannot be loaded ({type(error).__name__}: {error}); {offline}{LOCAL_DATA_HINT}"
        ) from error
    return _from_dataset(dataset, seed, text_field, description), description


def _from_dataset(dataset, seed: int, text_field: str, description: str) -> Iterator[str]:
    """Shuffle a Dataset / IterableDataset with the seed and yield its text column."""
    import datasets

    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        raise ConfigError(f"{description} has no text column {text_field!r}; its columns are {columns}: set text_field")
    if isinstance(dataset, datasets.IterableDataset):
        dataset = dataset.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    else:
        dataset = dataset.shuffle(seed=seed)
    return _texts(dataset, text_field, description)


def _texts(dataset, text_field: str, description: str) -> Iterator[str]:
    for row in dataset:
        if text_field not in row:
            raise ConfigError(f"{description} has no text column {text_field!r}; a row has {sorted(row)}")
        text = row[text_field]
        if not isinstance(text, str):
            raise ConfigError(f"{description}: column {text_field!r} holds {type(text).__name__}, not text")
        yield text


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


__all__: Sequence[str] = ["DEFAULT_DATASET", "load_calibration_data", "hub_offline"]
