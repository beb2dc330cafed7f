"""Fault catalogue of calibration files: CALIBRATION_FAULTS, ``load_calibration_data`` on damaged or empty local
files (the file, the line, the cause), ``datasets`` never called; files of every shape that still load, read once.
"""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import datasets
import pytest
import torch

import diep_hub.calibration
import diep_hub.calibration_sources
from diep_hub.calibration import load_calibration_data
from diep_hub.errors import ConfigError, CorruptFileError
from tests.helpers.calibration_files import DOCS, documents_jsonl, jsonl_with_bad_line
from tests.helpers.fault_catalogue import Fault, check_fault, ids
from tests.helpers.word_tokenizer import make_tokenizer


# ======================================================================================= calibration faults
def _file(name: str, content: bytes):
    def setup(tmp_path: Path):
        path = tmp_path / name
        path.write_bytes(content)
        return {"path": path}

    return setup


def _corrupt_gzip() -> bytes:
    """A gzip stream with bytes flipped in the middle of its deflate data."""
    data = bytearray(gzip.compress(documents_jsonl() * 20))
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    return bytes(data)


def _calibrate(text_field: str = "text"):
    def call(ctx):
        return load_calibration_data(ctx["path"], make_tokenizer(), num_samples=2, seq_len=8, seed=0,
                                     text_field=text_field, progress=False)

    return call


def _parquet(tmp_path: Path, name: str, columns: dict) -> dict:
    path = tmp_path / name
    datasets.Dataset.from_dict(columns).to_parquet(str(path))
    return {"path": path}


CALIBRATION_FAULTS = [
    Fault("empty-jsonl", _file("c.jsonl", b""), _calibrate(), ConfigError, ["c.jsonl", "has no text", "empty"]),
    Fault("blank-lines-jsonl", _file("c.jsonl", b"\n  \n\n"), _calibrate(), ConfigError, ["c.jsonl", "has no text"]),
    Fault("empty-txt", _file("c.txt", b""), _calibrate(), ConfigError, ["c.txt", "has no text"]),
    Fault("empty-json-list", _file("c.json", b"[]"), _calibrate(), ConfigError, ["c.json", "has no text"]),
    Fault("latin-1-txt-last-line", _file("c.txt", ("\n".join(DOCS) + "\ncaf\u00e9 w1\n").encode("latin-1")),
          _calibrate(), CorruptFileError, ["c.txt", "not UTF-8", "0xe9", f"line {len(DOCS) + 1}", "column 4"]),
    Fault("latin-1-jsonl", _file("c.jsonl", documents_jsonl(DOCS[:2]) + '{"text": "na\u00efve"}\n'.encode("latin-1")),
          _calibrate(), CorruptFileError, ["c.jsonl", "not UTF-8", "0xef", "line 3, column 13"]),
    Fault("truncated-gzip", _file("c.jsonl.gz", gzip.compress(documents_jsonl() * 20)[:300]), _calibrate(),
          CorruptFileError, ["c.jsonl.gz", "not a valid gzip file", "ended before the end-of-stream"]),
    Fault("corrupt-gzip", _file("c.jsonl.gz", _corrupt_gzip()), _calibrate(), CorruptFileError,
          ["c.jsonl.gz", "not a valid gzip file"]),
    Fault("plain-text-named-gz", _file("c.jsonl.gz", documents_jsonl()), _calibrate(), CorruptFileError,
          ["c.jsonl.gz", "not a valid gzip file", "Not a gzipped file"]),
    Fault("truncated-bz2", _file("c.txt.bz2", bz2.compress(("\n".join(DOCS) * 20).encode())[:200]), _calibrate(),
          CorruptFileError, ["c.txt.bz2", "not a valid bzip2 file"]),
    Fault("bad-jsonl-line-7", _file("c.jsonl", jsonl_with_bad_line(7)), _calibrate(), CorruptFileError,
          ["c.jsonl", "line 7 is not valid JSON", "column"]),
    Fault("bad-jsonl-first-line", _file("c.jsonl", jsonl_with_bad_line(1)), _calibrate(), CorruptFileError,
          ["c.jsonl", "is not valid JSON", "line 1", "column"]),
    Fault("jsonl-line-not-an-object",
          _file("c.jsonl", documents_jsonl()[:60].rsplit(b"\n", 1)[0] + b'\n["w1", "w2"]\n'),
          _calibrate(), CorruptFileError, ["c.jsonl", "line 2", "list", "expected an object"]),
    Fault("jsonl-without-text-field", _file("c.jsonl", documents_jsonl(field="content")), _calibrate(), ConfigError,
          ["c.jsonl", "no field 'text'", "line 1", "['content']", "text_field"]),
    Fault("jsonl-other-text-field", _file("c.jsonl", documents_jsonl()), _calibrate("body"), ConfigError,
          ["c.jsonl", "no field 'body'", "['text']"]),
    Fault("json-document-malformed",
          _file("c.json", json.dumps([{"text": d} for d in DOCS[:3]], indent=2).replace("},", "}", 1).encode()),
          _calibrate(), CorruptFileError, ["c.json", "not valid JSON", "line 5, column 3"]),
    Fault("json-list-of-numbers", _file("c.json", b"[1, 2, 3]"), _calibrate(), CorruptFileError,
          ["c.json", "list of int", "expected objects or strings"]),
    Fault("parquet-garbage", _file("c.parquet", b"PAR1 this is not parquet PAR1"), _calibrate(), CorruptFileError,
          ["c.parquet", "not a valid parquet file"]),
    Fault("parquet-without-column", lambda tmp: _parquet(tmp, "c.parquet", {"content": DOCS}), _calibrate(),
          ConfigError, ["c.parquet", "no column 'text'", "['content']"]),
    Fault("parquet-no-rows", lambda tmp: _parquet(tmp, "c.parquet", {"text": []}), _calibrate(), ConfigError,
          ["c.parquet", "has no text", "0 rows"]),
]


@pytest.fixture
def load_dataset_calls(monkeypatch):
    """Records calls of datasets.load_dataset: a file refused by our checks must never reach it."""
    calls = []
    original = datasets.load_dataset

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    return calls


@pytest.mark.parametrize("row", CALIBRATION_FAULTS, ids=ids(CALIBRATION_FAULTS))
def test_calibration_file_faults(row, tmp_path, load_dataset_calls):
    error = check_fault(row, tmp_path)
    assert "An error occurred while generating the dataset" not in str(error)
    assert load_dataset_calls == []


def test_working_files_of_every_shape_still_load_to_the_same_windows(tmp_path, load_dataset_calls):
    """The checks accept what datasets reads: gzip, bz2, a UTF-8 BOM, a pretty JSON list, a list of strings."""
    tokenizer = make_tokenizer()
    files = {
        "c.jsonl": documents_jsonl(),
        "c.jsonl.gz": gzip.compress(documents_jsonl()),
        "c.jsonl.bz2": bz2.compress(documents_jsonl()),
        "bom.jsonl": b"\xef\xbb\xbf" + documents_jsonl(),
        "blank-lines.jsonl": documents_jsonl().replace(b"\n", b"\n\n"),
        "pretty.json": json.dumps([{"text": d} for d in DOCS], indent=2).encode(),
        "strings.json": json.dumps(DOCS).encode(),
        "c.txt": ("\n".join(DOCS) + "\n").encode(),
        "c.txt.gz": gzip.compress(("\n".join(DOCS) + "\n").encode()),
    }
    windows = {}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        windows[name] = load_calibration_data(tmp_path / name, tokenizer, num_samples=4, seq_len=20, seed=3,
                                              progress=False)
    reference = windows["c.jsonl"]
    assert reference.shape == (4, 20) and int(reference.max()) < 44
    for name, window in windows.items():
        assert torch.equal(window, reference), name
    assert len(load_dataset_calls) == len(files)


def test_a_checked_file_is_read_once_until_it_changes(tmp_path, monkeypatch):
    """Preflight and the loader check the same file: the second check is free; an edit is checked again."""
    path = tmp_path / "c.jsonl"
    path.write_bytes(documents_jsonl())
    reads = []
    original = diep_hub.calibration_sources._check_json
    monkeypatch.setattr(diep_hub.calibration_sources, "_check_json", lambda *a: (reads.append(a[0]), original(*a)))
    diep_hub.calibration.check_text_file(path)
    diep_hub.calibration.check_text_file(path)
    assert reads == [path]
    path.write_bytes(documents_jsonl()[:50] + b"{broken\n")
    with pytest.raises(CorruptFileError, match="line 2 is not valid JSON"):
        diep_hub.calibration.check_text_file(path)
