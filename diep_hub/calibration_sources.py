"""Where calibration text comes from: a Hub dataset, a local file, a ``datasets`` object or a list of strings.

:func:`read_documents` turns any supported source into shuffled documents (``diep_hub.calibration`` tokenises
and packs them). A local file is read through by :func:`check_text_file` before ``datasets`` sees it
(``datasets`` turns any bad byte or line into "An error occurred while generating the dataset"): an empty file,
non-UTF-8 text, a damaged .gz/.bz2/.xz, a malformed JSON line or a missing text field is refused with the file,
the line and the cause.

Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or the Hub unreachable) a Hub name fails at once with a message
saying how to pass local data instead; when ``datasets`` itself is in offline mode a dataset already in the
local cache is still used (that lookup does not touch the network).
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, CorruptFileError

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "allenai/c4"
#: default config for datasets that require one
DEFAULT_CONFIGS = {"allenai/c4": "en", "c4": "en"}
#: suffix -> ``datasets`` builder for local files
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zstd")
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


def read_documents(source, seed, config_name, split, text_field, streaming, rng, purpose="calibration"):
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
        what = f"{purpose} file"
        if not path.is_file():
            raise ConfigError(f"{what} {str(path)!r} does not exist (or is not a file)")
        builder = _builder_for(path, what)
        field = "text" if builder == "text" else text_field
        # `datasets` reports any bad byte or line as "An error occurred while generating the dataset": read the
        # file ourselves first, so the message names the file, the line and the real cause.
        check_text_file(path, field, what=what)
        try:
            dataset = datasets.load_dataset(
                builder, data_files={"train": str(path)}, split="train", streaming=bool(streaming)
            )
        except datasets.exceptions.DatasetGenerationError as exc:
            cause = exc.__cause__ or exc
            raise CorruptFileError(
                f"{what} {path} cannot be read as {builder} data ({type(cause).__name__}: {cause})"
            ) from exc
        return _from_dataset(dataset, seed, field, str(path)), str(path)
    if isinstance(source, str) and source:
        return _from_hub(source, seed, config_name, split, text_field, streaming)
    raise ConfigError(
        f"calibration source {source!r} is not supported; give a Hub dataset name, a file path (.json, .jsonl, "
        ".parquet, .txt), a datasets.Dataset, or a list of strings"
    )


# ------------------------------------------------------------------------------------------ local file checks
#: compressed suffix -> (name in messages, opener of a binary stream)
_DECOMPRESSORS = {".gz": ("gzip", gzip.open), ".bz2": ("bzip2", bz2.open), ".xz": ("xz", lzma.open)}
#: files already checked, by (resolved path, size, mtime, builder, text field): preflight and loader read once
_CHECKED: set[tuple] = set()


def check_text_file(path: str | os.PathLike, text_field: str = "text", *, what: str = "calibration file") -> None:
    """Read a local text-data file through before ``datasets`` sees it; refuse it with a message naming the file.

    Checks that a compressed file decompresses to the end, that the text is UTF-8, that every JSON line parses
    (reporting its line number), that the first record has ``text_field``, and that there is any text at all. A
    file that passes is what ``datasets``' json / parquet / text builders read, so working files keep working.

    Raises:
        ConfigError: unsupported type, an empty file, or no ``text_field`` in the first record.
        CorruptFileError: not UTF-8, a damaged compressed file or parquet file, malformed JSON.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist (or is not a file)")
    builder = _builder_for(path, what)
    field = "text" if builder == "text" else text_field
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, builder, field)
    if key in _CHECKED:
        return
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path} is not readable (permission denied)")
    if builder == "parquet":
        _check_parquet(path, field, what)
    elif builder == "text":
        has_text = False
        for _, line in _text_lines(path, what):  # read to the end: a bad byte may sit on the last line
            has_text = has_text or bool(line.strip())
        if not has_text:
            raise ConfigError(f"{what} {path} has no text (the file is empty or holds only blank lines)")
    else:
        _check_json(path, field, what)
    _CHECKED.add(key)


def _compression(path: Path) -> tuple[str, Any] | None:
    suffix = path.suffix.lower()
    if suffix in (".zst", ".zstd"):
        try:
            import zstandard
        except ImportError:
            raise ConfigError(
                f"{path} is zstd-compressed and reading it needs the zstandard package: pip install zstandard"
            ) from None
        return "zstd", lambda p, mode: zstandard.open(p, mode)
    return _DECOMPRESSORS.get(suffix)


def _text_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a file, decompressed, read to the end; errors name the file and line."""
    compression = _compression(path)
    opener = compression[1] if compression else open
    number = 0
    try:
        with opener(path, "rb") as stream:
            for number, raw in enumerate(stream, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    column = len(raw[: exc.start].decode("utf-8", errors="replace")) + 1
                    raise CorruptFileError(
                        f"{what} {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {number}, column "
                        f"{column}); save it as UTF-8"
                    ) from None
                yield number, text
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        if compression is None:
            raise ConfigError(f"{what} {path} cannot be read ({type(exc).__name__}: {exc})") from None
        where = f"; after {number} readable line(s)" if number else ""
        raise CorruptFileError(
            f"{what} {path} is not a valid {compression[0]} file ({exc}{where}); re-create or re-download it"
        ) from None


def _check_json(path: Path, field: str, what: str) -> None:
    """JSON Lines (one object a line), or one JSON document: a list of objects or strings, or a dict of columns."""
    lines = _text_lines(path, what)
    first: tuple[int, Any] | None = None  # (line number, first record)
    for number, line in lines:
        if number == 1:
            line = line.lstrip("\ufeff")  # datasets strips a UTF-8 byte-order mark too
        stripped = line.strip()
        if not stripped:
            continue
        if first is None and stripped.startswith("["):
            first = (number, _json_document(path, what, line + "".join(rest for _, rest in lines), number - 1))
            break
        try:
            record = json.loads(stripped)
        except json.JSONDecodeError as exc:
            if first is not None:
                raise CorruptFileError(
                    f"{what} {path} line {number} is not valid JSON ({exc.msg} at column {exc.colno}); every line "
                    "of a JSON Lines file must be one object, e.g. {\"text\": \"...\"}"
                ) from None
            # Not JSON Lines: perhaps one JSON document over several lines.
            first = (number, _json_document(path, what, line + "".join(rest for _, rest in lines), number - 1))
            break
        if not isinstance(record, dict):
            raise CorruptFileError(
                f"{what} {path} line {number} holds a JSON {type(record).__name__}, expected an object "
                "{\"" + field + "\": \"...\"} per line"
            )
        if first is None:
            first = (number, record)
    if first is None:
        raise ConfigError(f"{what} {path} has no text (the file is empty or holds only blank lines)")
    number, record = first
    if isinstance(record, list):
        if not record:
            raise ConfigError(f"{what} {path} has no text (an empty JSON list)")
        item = record[0]
        if isinstance(item, str):  # datasets reads a list of strings as a "text" column
            fields = ["text"]
        elif isinstance(item, dict):
            fields = list(item)
        else:
            raise CorruptFileError(
                f"{what} {path} holds a JSON list of {type(item).__name__}, expected objects or strings"
            )
    elif isinstance(record, dict):
        if not record:
            raise ConfigError(f"{what} {path} has no text (an empty JSON object)")
        fields = list(record)
    else:
        raise CorruptFileError(f"{what} {path} holds a JSON {type(record).__name__}, expected objects")
    if field not in fields:
        raise ConfigError(
            f"{what} {path} has no field {field!r}: its first record (line {number}) has fields {sorted(fields)}; "
            "set text_field to the field that holds the text"
        )


def _json_document(path: Path, what: str, text: str, offset: int = 0) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(
            f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno + offset}, column {exc.colno}); "
            "give JSON Lines (one object a line) or one JSON list of objects"
        ) from None


def _check_parquet(path: Path, field: str, what: str) -> None:
    if _compression(path) is not None:  # a compressed parquet file: only check that it decompresses
        for _ in _text_lines(path, what):
            pass
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(str(path))
        names, rows = meta.schema_arrow.names, meta.metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{what} {path} is not a valid parquet file ({exc})") from None
    if field not in names:
        raise ConfigError(f"{what} {path} has no column {field!r}; its columns are {names}: set text_field")
    if rows == 0:
        raise ConfigError(f"{what} {path} has no text (0 rows)")


# -------------------------------------------------------------------------------------- Hub and datasets


def describe_source(source) -> str:
    """A source for reports and ``DiEPPruner.to_dict``: a path or name as given, anything else by its type."""
    if isinstance(source, str):
        return source
    if isinstance(source, os.PathLike):
        return os.fspath(source)
    if isinstance(source, list):
        return f"<list of {len(source)} strings>"
    return f"<{type(source).__name__}>"


def _looks_local(source: str) -> bool:
    """A string names a local file when it exists, or looks like a path (separator start, known suffix)."""
    if os.path.exists(source) or source.startswith((".", "/", "~")):
        return True
    suffixes = [s.lower() for s in Path(source).suffixes]
    return any(s in LOCAL_BUILDERS for s in suffixes)


def _builder_for(path: Path, what: str = "calibration file") -> str:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes.pop()
    builder = LOCAL_BUILDERS.get(suffixes[-1]) if suffixes else None
    if builder is None:
        raise ConfigError(
            f"{what} {str(path)!r} has an unsupported type; use one of {sorted(LOCAL_BUILDERS)} "
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


__all__: Sequence[str] = [
    "DEFAULT_DATASET",
    "check_text_file",
    "describe_source",
    "hub_offline",
    "read_documents",
]
