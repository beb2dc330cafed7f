"""Calibration data: every local source, packing, reproducibility, clear errors, and a fast offline refusal."""

from __future__ import annotations

import json
import time

import datasets
import pytest
import torch

from diep_hub.calibration import load_calibration_data
from diep_hub.errors import ConfigError
from tests.helpers.word_tokenizer import make_documents, make_tokenizer

EOS = 2
WORDS_PER_DOC = 10


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def documents():
    return make_documents(30, WORDS_PER_DOC)


def _write_sources(tmp_path, documents):
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents)))
    json_file = tmp_path / "calib.json"
    json_file.write_text(json.dumps([{"content": d} for d in documents]))
    txt = tmp_path / "calib.txt"
    txt.write_text("\n".join(documents) + "\n")
    parquet = tmp_path / "calib.parquet"
    datasets.Dataset.from_dict({"text": documents}).to_parquet(str(parquet))
    return {"jsonl": jsonl, "json": json_file, "txt": txt, "parquet": parquet}


def _check_windows(batch: torch.Tensor, documents: list[str], tokenizer, num_samples: int, seq_len: int):
    """Shape, dtype, and that the stream is whole documents separated by EOS (a window of real text)."""
    assert batch.shape == (num_samples, seq_len)
    assert batch.dtype == torch.long
    stream = batch.reshape(-1).tolist()
    vocab_docs = {tuple(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in documents}
    # Split on EOS: every complete inner piece is one of the documents, tokenised.
    pieces, current = [], []
    for token in stream:
        if token == EOS:
            pieces.append(tuple(current))
            current = []
        else:
            current.append(token)
    inner = pieces[1:]  # the first piece may start mid-document (seeded offset)
    assert inner, "expected at least one EOS-separated document in the window"
    assert all(piece in vocab_docs for piece in inner)
    assert 3 not in stream  # no <unk>: the words all came from the documents
    return inner


@pytest.mark.parametrize("kind", ["jsonl", "json", "txt", "parquet", "dataset", "list"])
def test_every_source_packs_real_documents(kind, tmp_path, tokenizer, documents):
    paths = _write_sources(tmp_path, documents)
    source = {
        "dataset": datasets.Dataset.from_dict({"text": documents}),
        "list": documents,
    }.get(kind, paths.get(kind))
    text_field = "content" if kind == "json" else "text"
    batch = load_calibration_data(source, tokenizer, num_samples=4, seq_len=25, seed=0, text_field=text_field)
    pieces = _check_windows(batch, documents, tokenizer, 4, 25)
    assert all(len(p) == WORDS_PER_DOC for p in pieces)


def test_same_source_same_seed_same_tensor_across_source_kinds(tmp_path, tokenizer, documents):
    paths = _write_sources(tmp_path, documents)
    a = load_calibration_data(paths["jsonl"], tokenizer, num_samples=3, seq_len=16, seed=5)
    b = load_calibration_data(str(paths["jsonl"]), tokenizer, num_samples=3, seq_len=16, seed=5)
    assert torch.equal(a, b)
    # A Dataset holding the same rows shuffles the same way (datasets' seeded shuffle).
    c = load_calibration_data(
        datasets.Dataset.from_dict({"text": documents}), tokenizer, num_samples=3, seq_len=16, seed=5
    )
    assert torch.equal(a, c)


def test_reproducible_and_seed_dependent(tokenizer, documents):
    first = load_calibration_data(documents, tokenizer, num_samples=4, seq_len=20, seed=1)
    again = load_calibration_data(documents, tokenizer, num_samples=4, seq_len=20, seed=1)
    other = load_calibration_data(documents, tokenizer, num_samples=4, seq_len=20, seed=2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_exactly_enough_text_uses_all_of_it(tokenizer):
    docs = ["w1 w2 w3", "w4 w5 w6 w7"]
    # 3 + 1 (EOS) + 4 = 8 tokens: exactly two windows of 4.
    batch = load_calibration_data(docs, tokenizer, num_samples=2, seq_len=4, seed=0)
    assert sorted(batch.reshape(-1).tolist()) == sorted([5, 6, 7, EOS, 8, 9, 10, 11])
    assert batch.reshape(-1).tolist().count(EOS) == 1


def test_empty_documents_are_skipped(tokenizer):
    batch = load_calibration_data(["", "   ", "w1 w2", "w3"], tokenizer, num_samples=1, seq_len=4, seed=0)
    assert sorted(batch.reshape(-1).tolist()) == sorted([5, 6, EOS, 7])


def test_not_enough_text_says_found_and_needed(tokenizer):
    with pytest.raises(ConfigError, match=r"has 8 tokens.*needs 100"):
        load_calibration_data(["w1 w2 w3", "w4 w5 w6 w7"], tokenizer, num_samples=10, seq_len=10)


def test_offline_hub_name_fails_fast_with_local_data_hint(tokenizer):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_calibration_data("allenai/c4", tokenizer, num_samples=2, seq_len=8)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    message = str(info.value)
    assert "allenai/c4" in message and "'en'" in message  # the default C4 config is filled in
    assert "offline" in message
    assert "file path" in message and "datasets.Dataset" in message and "list of strings" in message


def test_offline_switch_set_after_import_still_refuses_at_once(tokenizer, monkeypatch):
    # datasets read its offline flag at import; our check reads the environment at call time.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="offline.*file path"):
        load_calibration_data("someone/some-dataset", tokenizer, num_samples=2, seq_len=8)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, r"num_samples=0 must be an integer >= 1"),
        ({"seq_len": -3}, r"seq_len=-3 must be an integer >= 1"),
        ({"num_samples": 2.5}, r"num_samples=2.5"),
        ({"seed": "x"}, r"seed='x' must be an integer"),
    ],
)
def test_bad_arguments_are_refused(tokenizer, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_calibration_data(["w1 w2"], tokenizer, **kwargs)


def test_bad_sources_are_refused(tmp_path, tokenizer, documents):
    with pytest.raises(ConfigError, match="does not exist"):
        load_calibration_data(str(tmp_path / "missing.jsonl"), tokenizer)
    csv = tmp_path / "data.csv"
    csv.write_text("text\nw1 w2\n")
    with pytest.raises(ConfigError, match=r"unsupported type.*\.jsonl"):
        load_calibration_data(csv, tokenizer)
    with pytest.raises(ConfigError, match=r"no text column 'body'.*\['text'\]"):
        load_calibration_data(datasets.Dataset.from_dict({"text": documents}), tokenizer, text_field="body")
    with pytest.raises(ConfigError, match="must hold strings"):
        load_calibration_data(["w1", 3], tokenizer)
    with pytest.raises(ConfigError, match="not supported"):
        load_calibration_data(42, tokenizer)


def test_dataset_dict_uses_split(tokenizer):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["w1 w1 w1 w1"]}),
            "validation": datasets.Dataset.from_dict({"text": ["w2 w2 w2 w2"]}),
        }
    )
    batch = load_calibration_data(dd, tokenizer, num_samples=1, seq_len=4, split="validation")
    assert batch.tolist() == [[6, 6, 6, 6]]
    with pytest.raises(ConfigError, match=r"split='test'.*\['train', 'validation'\]"):
        load_calibration_data(dd, tokenizer, split="test")


def test_streaming_a_local_file_packs_real_documents(tmp_path, tokenizer, documents):
    paths = _write_sources(tmp_path, documents)
    batch = load_calibration_data(paths["jsonl"], tokenizer, num_samples=2, seq_len=30, seed=0, streaming=True)
    _check_windows(batch, documents, tokenizer, 2, 30)
    again = load_calibration_data(paths["jsonl"], tokenizer, num_samples=2, seq_len=30, seed=0, streaming=True)
    assert torch.equal(batch, again)
