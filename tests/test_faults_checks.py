"""Fault catalogue of the checks before work: recipes, calibration files, run inputs, and a tokenizer of another model.

Tables of :class:`Fault` rows (tests/helpers/fault_catalogue.py), one parametrized test a table:

- RECIPE_FAULTS: ``load_recipe`` on duplicated keys, non-UTF-8 bytes, malformed YAML, a top level that is not a
  mapping, and non-finite or out-of-range numbers, named by their recipe field (never the pruner's Python name);
- NUMBER_FAULTS: every numeric recipe field with NaN and inf -> ``field: ... must be a finite number``;
- PRUNER_FAULTS: ``DiEPPruner(...)`` with sparsity 0, NaN and inf learning rates;
- CALIBRATION_FAULTS: ``load_calibration_data`` on damaged or empty local files (the file, the line, the cause),
  ``datasets`` never called;
- PREFLIGHT_FAULTS: ``check_run_inputs`` on unreachable sources, lengths above the model's positions and unknown
  lm-eval tasks, with the model loaders patched to fail the test if anything tries to load weights;
- VOCAB_FAULTS: a tokenizer whose ids exceed the model's vocabulary, refused before scoring or a forward pass.
"""

from __future__ import annotations

import bz2
import gzip
import json
import math
import time
from pathlib import Path

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import diep_hub.calibration
import diep_hub.calibration_sources
import diep_hub.evaluation.lm_eval_runner as lm_eval_runner
from diep_hub.calibration import load_calibration_data
from diep_hub.criteria import base as criteria_base
from diep_hub.errors import ConfigError, CorruptFileError
from diep_hub.evaluation.perplexity import perplexity
from diep_hub.preflight import check_run_inputs
from diep_hub.pruner import DiEPPruner
from diep_hub.recipe import Recipe, RecipeError, load_recipe
from diep_hub.tiny import TINY_TASK, tiny_config
from tests.helpers.fault_catalogue import Fault, check_fault, ids
from tests.helpers.tiny_models import tiny_model
from tests.helpers.word_tokenizer import make_documents, make_tokenizer, pruner_texts, pruner_tokenizer

DOCS = make_documents(30, 10)
FAST = dict(num_samples=8, seq_len=16, batch_size=4, epochs=2, progress=False)


def _nothing_on_disk_but(*names: str):
    """on_disk check: the tmp folder holds exactly the files the setup wrote (no cache, no output)."""

    def check(ctx):
        root: Path = ctx["tmp_path"]
        found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        assert found == sorted(names), found

    return check


# ============================================================================================ recipe faults
def _recipe(text: str | bytes, name: str = "r.yaml"):
    def setup(tmp_path: Path):
        path = tmp_path / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return {"path": path}

    return setup


def _load(ctx):
    return load_recipe(ctx["path"])


RECIPE_FAULTS = [
    Fault(
        "duplicate-top-level-section",
        _recipe("model:\n  id: a/b\npruning:\n  sparsity: 0.25\nevaluation:\n  enabled: false\npruning:\n"
                "  method: reap\n"),
        _load, RecipeError, ["r.yaml", "pruning", "twice", "line 3", "line 7", "give each key once"],
    ),
    Fault(
        "duplicate-key-inside-a-section",
        _recipe("model: {id: a/b}\npruning:\n  search:\n    lr: 0.01\n    epochs: 3\n    lr: 0.1\n"),
        _load, RecipeError, ["r.yaml", "pruning.search.lr", "twice", "line 4", "line 6"],
    ),
    Fault(
        "duplicate-key-in-flow-mapping",
        _recipe("model: {id: a/b, dtype: float32, id: c/d}\n"),
        _load, RecipeError, ["model.id", "twice", "line 1"],
    ),
    Fault(
        "latin-1-bytes",
        _recipe("# recette\nmodel:\n  id: a/b\n# r\u00e9sum\u00e9\n".encode("latin-1")),
        _load, CorruptFileError, ["recipe", "r.yaml", "not UTF-8", "0xe9", "line 4"],
    ),
    Fault(
        "malformed-yaml",
        _recipe("model:\n  id: a/b\npruning: {sparsity: 0.5\n"),
        _load, RecipeError, ["cannot parse recipe", "r.yaml", "line 4", "column 1"],
    ),
    Fault(
        "bad-indentation",
        _recipe("model:\n  id: a/b\n pruning:\n  sparsity: 0.5\n"),
        _load, RecipeError, ["cannot parse recipe", "r.yaml", "line 3", "column"],
    ),
    Fault("top-level-list", _recipe("- model\n- pruning\n"), _load, RecipeError,
          ["r.yaml", "<top level>", "list", "a mapping with a 'model' section"]),
    Fault("top-level-string", _recipe("just some text\n"), _load, RecipeError,
          ["<top level>", "str", "a mapping"]),
    Fault("empty-file", _recipe(""), _load, RecipeError, ["r.yaml", "empty", "a mapping with a 'model' section"]),
    Fault("lr-inf", _recipe("model: {id: a/b}\npruning:\n  search: {lr: .inf}\n"), _load, RecipeError,
          ["pruning.search.lr: inf", "must be a finite number", "(0, inf)"]),
    Fault("lr-nan", _recipe("model: {id: a/b}\npruning:\n  search: {lr: .nan}\n"), _load, RecipeError,
          ["pruning.search.lr: nan", "must be a finite number"]),
    Fault("lr-zero", _recipe("model: {id: a/b}\npruning:\n  search: {lr: 0}\n"), _load, RecipeError,
          ["pruning.search.lr: 0", "out of range", "(0, inf)"]),
    Fault("sparsity-zero", _recipe("model: {id: a/b}\npruning: {sparsity: 0}\n"), _load, RecipeError,
          ["pruning.sparsity: 0", "out of range", "(0, 1)"]),
    Fault("lambda-negative", _recipe("model: {id: a/b}\npruning:\n  search: {lambda: -0.5}\n"), _load, RecipeError,
          ["pruning.search.lambda: -0.5", "out of range", "[0, inf)"]),
    Fault("epochs-fractional", _recipe("model: {id: a/b}\npruning:\n  search: {epochs: 2.5}\n"), _load, RecipeError,
          ["pruning.search.epochs: 2.5", "must be an integer", "[1, inf)"]),
    Fault("max-layer-sparsity-one", _recipe("model: {id: a/b}\npruning:\n  floors: {max_layer_sparsity: 1.0}\n"),
          _load, RecipeError, ["pruning.floors.max_layer_sparsity: 1.0", "out of range", "(0, 1)"]),
]


@pytest.mark.parametrize("row", RECIPE_FAULTS, ids=ids(RECIPE_FAULTS))
def test_recipe_faults(row, tmp_path):
    error = check_fault(row, tmp_path)
    lines = "\n".join(getattr(error, "problems", [str(error)]))  # the file's path may hold any word
    # Named by the recipe field, never by the pruner's Python name or configuration.
    assert "DiEPPruner" not in lines and "lambda_" not in lines and "lr=" not in lines


def test_a_key_given_once_per_mapping_still_loads(tmp_path):
    """The same key in different sections, and a YAML merge key overridden, are not duplicates."""
    path = tmp_path / "ok.yaml"
    path.write_text(
        "model: {id: a/b}\n"
        "pruning:\n  calibration: &cal {num_samples: 4, seq_len: 16, path: data.jsonl}\n"
        "skipping: {num_samples: 8}\n"
        "evaluation:\n  perplexity:\n    <<: *cal\n    seq_len: 32\n",
        encoding="utf-8",
    )
    recipe = load_recipe(path)
    cal, ppl = recipe.pruning.calibration, recipe.evaluation.perplexity
    assert (cal.num_samples, cal.seq_len, cal.path) == (4, 16, "data.jsonl")
    assert (ppl.num_samples, ppl.seq_len, ppl.path) == (4, 32, "data.jsonl")
    assert recipe.skipping.num_samples == 8


# ----------------------------------------------------------------------------- every numeric field, NaN and inf
NUMERIC_FIELDS = [
    ("pruning", "sparsity"),
    ("pruning", "seed"),
    ("pruning.calibration", "num_samples"),
    ("pruning.calibration", "seq_len"),
    ("pruning.search", "lr"),
    ("pruning.search", "epochs"),
    ("pruning.search", "batch_size"),
    ("pruning.search", "lambda"),
    ("pruning.floors", "min_experts_per_layer"),
    ("pruning.floors", "max_layer_sparsity"),
    ("skipping", "num_samples"),
    ("evaluation", "limit"),
    ("evaluation", "batch_size"),
    ("evaluation", "num_fewshot"),
    ("evaluation.perplexity", "num_samples"),
    ("evaluation.perplexity", "seq_len"),
]


def _nested(section: str, key: str, value) -> dict:
    data: dict = {"model": {"id": "a/b"}}
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    return data


def _from_dict(data):
    return lambda ctx: Recipe.from_dict(data, source="r.yaml")


NUMBER_FAULTS = [
    Fault(f"{section}.{key}={text}", lambda tmp: {}, _from_dict(_nested(section, key, value)), RecipeError,
          [f"{section}.{key}: {text}", "must be a finite number"])
    for section, key in NUMERIC_FIELDS
    for text, value in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf))
]


@pytest.mark.parametrize("row", NUMBER_FAULTS, ids=ids(NUMBER_FAULTS))
def test_every_numeric_recipe_field_refuses_nan_and_inf(row, tmp_path):
    error = check_fault(row, tmp_path)
    assert len(error.problems) == 1, error.problems


# ============================================================================================ pruner faults
PRUNER_FAULTS = [
    Fault("sparsity-zero", lambda tmp: {}, lambda ctx: DiEPPruner(sparsity=0), ConfigError,
          ["sparsity: 0 -> is out of range; allowed: (0, 1)"]),
    Fault("sparsity-nan", lambda tmp: {}, lambda ctx: DiEPPruner(sparsity=math.nan), ConfigError,
          ["sparsity: nan -> must be a finite number in (0, 1)"]),
    Fault("lr-nan", lambda tmp: {}, lambda ctx: DiEPPruner(lr=math.nan), ConfigError,
          ["lr: nan -> must be a finite number in (0, inf)"]),
    Fault("lr-inf", lambda tmp: {}, lambda ctx: DiEPPruner(lr=math.inf), ConfigError,
          ["lr: inf -> must be a finite number in (0, inf)"]),
    Fault("lambda-inf", lambda tmp: {}, lambda ctx: DiEPPruner(lambda_=math.inf), ConfigError,
          ["lambda_: inf -> must be a finite number in [0, inf)"]),
    Fault("epochs-inf", lambda tmp: {}, lambda ctx: DiEPPruner(epochs=math.inf), ConfigError,
          ["epochs: inf -> must be a finite number (an integer) in [1, inf)"]),
]


@pytest.mark.parametrize("row", PRUNER_FAULTS, ids=ids(PRUNER_FAULTS))
def test_pruner_faults(row, tmp_path):
    check_fault(row, tmp_path)


# Recipe field, pruner keyword, value: the recipe line and the pruner message give the same reason.
SAME_MESSAGE = [
    ("pruning", "sparsity", "sparsity", 0),
    ("pruning", "sparsity", "sparsity", 1.0),
    ("pruning.search", "lr", "lr", math.nan),
    ("pruning.search", "lr", "lr", math.inf),
    ("pruning.search", "lambda", "lambda_", -1.0),
    ("pruning.search", "epochs", "epochs", 0),
    ("pruning.calibration", "seq_len", "seq_len", 1),
    ("pruning.floors", "max_layer_sparsity", "max_layer_sparsity", math.nan),
]


@pytest.mark.parametrize(("section", "key", "kwarg", "value"), SAME_MESSAGE, ids=lambda v: str(v))
def test_same_value_same_message_in_recipe_and_pruner(section, key, kwarg, value):
    with pytest.raises(RecipeError) as recipe_error:
        Recipe.from_dict(_nested(section, key, value))
    (line,) = recipe_error.value.problems
    prefix = f"{section}.{key}: {value!r} -> "
    assert line.startswith(prefix), line
    reason = line.removeprefix(prefix)
    with pytest.raises(ConfigError) as pruner_error:
        DiEPPruner(**{kwarg: value})
    assert str(pruner_error.value) == f"invalid DiEPPruner configuration: {kwarg}: {value!r} -> {reason}"


_ANY_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3))


@settings(max_examples=150, deadline=None)
@given(sparsity=_ANY_FLOAT, lr=_ANY_FLOAT, lambda_=_ANY_FLOAT, cap=_ANY_FLOAT)
def test_the_recipe_accepts_exactly_what_the_pruner_accepts(sparsity, lr, lambda_, cap):
    data = {"model": {"id": "a/b"}, "pruning": {"sparsity": sparsity, "search": {"lr": lr, "lambda": lambda_},
                                                "floors": {"max_layer_sparsity": cap}}}
    try:
        recipe = Recipe.from_dict(data)
    except RecipeError:
        recipe_ok = False
    else:
        recipe_ok = True
        DiEPPruner(**recipe.to_pruner_kwargs())  # whatever the recipe accepts builds a pruner
    try:
        DiEPPruner(sparsity=sparsity, lr=lr, lambda_=lambda_, max_layer_sparsity=cap)
    except ConfigError:
        pruner_ok = False
    else:
        pruner_ok = True
    assert recipe_ok == pruner_ok


# ======================================================================================= calibration faults
def _jsonl(docs=DOCS, field="text") -> bytes:
    return "".join(json.dumps({field: d}) + "\n" for d in docs).encode("utf-8")


def _file(name: str, content: bytes):
    def setup(tmp_path: Path):
        path = tmp_path / name
        path.write_bytes(content)
        return {"path": path}

    return setup


def _corrupt_gzip() -> bytes:
    """A gzip stream with bytes flipped in the middle of its deflate data."""
    data = bytearray(gzip.compress(_jsonl() * 20))
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    return bytes(data)


def _bad_line(number: int) -> bytes:
    lines = _jsonl().decode().splitlines()
    lines[number - 1] = '{"text": "w1 w2", }'
    return ("\n".join(lines) + "\n").encode()


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
    Fault("latin-1-jsonl", _file("c.jsonl", _jsonl(DOCS[:2]) + '{"text": "na\u00efve"}\n'.encode("latin-1")),
          _calibrate(), CorruptFileError, ["c.jsonl", "not UTF-8", "0xef", "line 3, column 13"]),
    Fault("truncated-gzip", _file("c.jsonl.gz", gzip.compress(_jsonl() * 20)[:300]), _calibrate(),
          CorruptFileError, ["c.jsonl.gz", "not a valid gzip file", "ended before the end-of-stream"]),
    Fault("corrupt-gzip", _file("c.jsonl.gz", _corrupt_gzip()), _calibrate(), CorruptFileError,
          ["c.jsonl.gz", "not a valid gzip file"]),
    Fault("plain-text-named-gz", _file("c.jsonl.gz", _jsonl()), _calibrate(), CorruptFileError,
          ["c.jsonl.gz", "not a valid gzip file", "Not a gzipped file"]),
    Fault("truncated-bz2", _file("c.txt.bz2", bz2.compress(("\n".join(DOCS) * 20).encode())[:200]), _calibrate(),
          CorruptFileError, ["c.txt.bz2", "not a valid bzip2 file"]),
    Fault("bad-jsonl-line-7", _file("c.jsonl", _bad_line(7)), _calibrate(), CorruptFileError,
          ["c.jsonl", "line 7 is not valid JSON", "column"]),
    Fault("bad-jsonl-first-line", _file("c.jsonl", _bad_line(1)), _calibrate(), CorruptFileError,
          ["c.jsonl", "is not valid JSON", "line 1", "column"]),
    Fault("jsonl-line-not-an-object", _file("c.jsonl", _jsonl()[:60].rsplit(b"\n", 1)[0] + b'\n["w1", "w2"]\n'),
          _calibrate(), CorruptFileError, ["c.jsonl", "line 2", "list", "expected an object"]),
    Fault("jsonl-without-text-field", _file("c.jsonl", _jsonl(field="content")), _calibrate(), ConfigError,
          ["c.jsonl", "no field 'text'", "line 1", "['content']", "text_field"]),
    Fault("jsonl-other-text-field", _file("c.jsonl", _jsonl()), _calibrate("body"), ConfigError,
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
        "c.jsonl": _jsonl(),
        "c.jsonl.gz": gzip.compress(_jsonl()),
        "c.jsonl.bz2": bz2.compress(_jsonl()),
        "bom.jsonl": b"\xef\xbb\xbf" + _jsonl(),
        "blank-lines.jsonl": _jsonl().replace(b"\n", b"\n\n"),
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
    path.write_bytes(_jsonl())
    reads = []
    original = diep_hub.calibration_sources._check_json
    monkeypatch.setattr(diep_hub.calibration_sources, "_check_json", lambda *a: (reads.append(a[0]), original(*a)))
    diep_hub.calibration.check_text_file(path)
    diep_hub.calibration.check_text_file(path)
    assert reads == [path]
    path.write_bytes(_jsonl()[:50] + b"{broken\n")
    with pytest.raises(CorruptFileError, match="line 2 is not valid JSON"):
        diep_hub.calibration.check_text_file(path)


# ======================================================================================== preflight faults
class FakeTaskManager:
    """lm-eval's TaskManager as far as the checks use it (``all_tasks``), without indexing 15k built-in tasks."""

    BUILTIN = ["boolq", "boolqa_bn", "mmlu", "mmlu_anatomy", "rte", "openbookqa", "hellaswag", "arc_easy"]
    built: list[tuple] = []

    def __init__(self, include_path=None, include_defaults=True):
        type(self).built.append((include_path, include_defaults))
        local = sorted(p.stem for p in Path(include_path).glob("*.yaml")) if include_path else []
        self.all_tasks = (list(self.BUILTIN) if include_defaults else []) + local


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """Fail the test if anything loads a model, a tokenizer or a dataset; keep the offline-corpus cache apart."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"loaded something during the checks: {args} {kwargs}")

    import transformers

    import diep_hub.model_loading

    # Where the run's load stage and `diep-hub eval` look load_model up.
    monkeypatch.setattr(diep_hub.model_loading, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setenv("DIEP_HUB_CACHE", str(tmp_path / "diep-cache"))
    # No dataset is in a local cache: the offline refusal must not depend on this machine's caches.
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "no-datasets-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "no-hub-cache"))
    monkeypatch.setattr(lm_eval_runner, "_MANAGERS", {})
    import lm_eval.tasks

    FakeTaskManager.built = []
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeTaskManager)


def _run_inputs(data: dict, files: dict[str, bytes] | None = None, config=None):
    """setup: recipe data (its folder is tmp_path, so relative paths resolve there) plus files to write."""

    def setup(tmp_path: Path):
        for name, content in (files or {}).items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(content)
        recipe = Recipe.from_dict(data, base_dir=tmp_path)
        return {"recipe": recipe, "config": config}

    return setup


def _check(ctx):
    return check_run_inputs(ctx["recipe"], ctx["config"])


def _tasks(*names: str, include_path: str | None = None) -> dict:
    evaluation = {"tasks": list(names)}
    if include_path is not None:
        evaluation["include_path"] = include_path
    return {"model": {"id": "diep-hub/tiny-mixtral"}, "pruning": {"calibration": {"dataset": "diep-hub/tiny-text"}},
            "evaluation": evaluation}


def _local_task(name: str) -> dict[str, bytes]:
    return {f"tasks/{name}.yaml": f"task: {name}\ndataset_path: json\n".encode()}


TINY = {"model": {"id": "diep-hub/tiny-mixtral"}, "pruning": {"calibration": {"dataset": "diep-hub/tiny-text"}}}

PREFLIGHT_FAULTS = [
    Fault("offline-hub-calibration", _run_inputs({"model": {"id": "a/b"}}), _check, ConfigError,
          ["pruning.calibration.dataset", "'allenai/c4'", "offline mode is on", "HF_HUB_OFFLINE",
           "pruning.calibration.path"], on_disk=_nothing_on_disk_but()),
    Fault("offline-hub-perplexity",
          _run_inputs({**TINY, "evaluation": {"perplexity": {"dataset": "wikitext"}}}), _check, ConfigError,
          ["evaluation.perplexity.dataset", "'wikitext'", "offline mode is on"], on_disk=_nothing_on_disk_but()),
    Fault("offline-hub-both-in-one-message",
          _run_inputs({"model": {"id": "a/b"}, "evaluation": {"perplexity": {"dataset": "wikitext"}}}), _check,
          ConfigError, ["2 problems", "pruning.calibration.dataset", "evaluation.perplexity.dataset"]),
    Fault("calibration-path-missing",
          _run_inputs({"model": {"id": "a/b"}, "pruning": {"calibration": {"path": "data/missing.jsonl"}}}),
          _check, ConfigError, ["pruning.calibration.path", "'data/missing.jsonl'", "does not exist"]),
    Fault("calibration-path-is-a-folder",
          _run_inputs({"model": {"id": "a/b"}, "pruning": {"calibration": {"path": "data"}}},
                      {"data/x.txt": b"w1\n"}),
          _check, ConfigError, ["pruning.calibration.path", "'data'", "is a folder"]),
    Fault("calibration-file-corrupt-gzip",
          _run_inputs({"model": {"id": "a/b"}, "pruning": {"calibration": {"path": "c.jsonl.gz"}}},
                      {"c.jsonl.gz": gzip.compress(_jsonl())[:100]}),
          _check, CorruptFileError, ["pruning.calibration.path", "c.jsonl.gz", "not a valid gzip file"],
          on_disk=_nothing_on_disk_but("c.jsonl.gz")),
    Fault("calibration-file-without-text-field",
          _run_inputs({"model": {"id": "a/b"}, "pruning": {"calibration": {"path": "c.jsonl"}}},
                      {"c.jsonl": _jsonl(field="body")}),
          _check, ConfigError, ["pruning.calibration.path", "no field 'text'", "['body']"]),
    Fault("perplexity-file-bad-line",
          _run_inputs({**TINY, "evaluation": {"perplexity": {"path": "p.jsonl"}}}, {"p.jsonl": _bad_line(3)}),
          _check, CorruptFileError, ["evaluation.perplexity.path", "perplexity file", "line 3 is not valid JSON"]),
    Fault("offline-corpus-unknown-split",
          _run_inputs({"model": {"id": "a/b"},
                       "pruning": {"calibration": {"dataset": "diep-hub/tiny-text", "split": "validation"}}}),
          _check, ConfigError, ["pruning.calibration.split", "'validation'", "train, test"]),
    Fault("include-path-missing", _run_inputs(_tasks("boolq", include_path="no-tasks-here")), _check,
          ConfigError, ["evaluation.include_path", "'no-tasks-here'", "does not exist"]),
    Fault("seq-len-above-positions",
          _run_inputs({**TINY, "pruning": {"calibration": {"dataset": "diep-hub/tiny-text", "seq_len": 1024}},
                       "evaluation": {"perplexity": {"dataset": "diep-hub/tiny-text", "seq_len": 600}}},
                      config=tiny_config()),
          _check, ConfigError, ["2 problems", "pruning.calibration.seq_len: 1024", "evaluation.perplexity.seq_len: 600",
                                "max_position_embeddings 512"]),
    Fault("unknown-builtin-task", _run_inputs(_tasks("boolqq", "rte", "zzzyx")), _check, ConfigError,
          ["evaluation.tasks", "['boolqq', 'zzzyx']", "'boolqq': did you mean 'boolq'", "'zzzyx': no close match",
           "lm-eval ls tasks"]),
    Fault("unknown-task-in-include-path",
          _run_inputs(_tasks("my_task", "my_tsak", include_path="tasks"), _local_task("my_task")),
          _check, ConfigError, ["evaluation.tasks", "'my_tsak': did you mean 'my_task'", "include_path='tasks'"]),
    Fault("offline-task-needs-no-include-path-but-typo",
          _run_inputs(_tasks(TINY_TASK, "diep_tiny_arth")), _check, ConfigError,
          ["evaluation.tasks", "'diep_tiny_arth': did you mean 'diep_tiny_arith'"]),
]


@pytest.mark.parametrize("row", PREFLIGHT_FAULTS, ids=ids(PREFLIGHT_FAULTS))
def test_preflight_faults(row, tmp_path, no_weights):
    started = time.perf_counter()
    check_fault(row, tmp_path)
    assert time.perf_counter() - started < 5.0  # no retries, no index of lm-eval's real tasks
    assert not (tmp_path / "diep-cache").exists()  # offline corpora only recognised by name, never written


def test_problem_classes_are_checked_in_order(tmp_path, no_weights):
    """A bad source is reported alone: lengths and task names are only looked at once the sources are fine."""
    recipe = Recipe.from_dict({"model": {"id": "a/b"}, "pruning": {"calibration": {"seq_len": 4096}},
                               "evaluation": {"tasks": ["boolqq"]}})
    with pytest.raises(ConfigError) as info:
        check_run_inputs(recipe, tiny_config())
    assert "pruning.calibration.dataset" in str(info.value)
    assert "seq_len" not in str(info.value) and "boolqq" not in str(info.value)
    assert FakeTaskManager.built == []


def test_good_inputs_pass_and_build_the_task_index_once(tmp_path, no_weights):
    (tmp_path / "c.jsonl").write_bytes(_jsonl())
    recipe = Recipe.from_dict({
        "model": {"id": "a/b"},
        "pruning": {"calibration": {"path": "c.jsonl", "seq_len": 512}},
        "evaluation": {"tasks": ["boolq", "mmlu"], "perplexity": {"path": "c.jsonl", "seq_len": 64}},
    }, base_dir=tmp_path)
    assert check_run_inputs(recipe, tiny_config()) is None
    assert check_run_inputs(recipe, tiny_config()) is None
    assert FakeTaskManager.built == [(None, True)]  # cached: the evaluation reuses it
    # run_lm_eval's lookup gets the same manager, without building another.
    assert lm_eval_runner._task_manager(FakeTaskManager, ["boolq"], None).all_tasks[:1] == ["boolq"]
    assert FakeTaskManager.built == [(None, True)]


def test_the_offline_recipes_pass_without_writing_anything(tmp_path, no_weights):
    for name in ("tiny", "zoo-mixtral-8e"):
        recipe = load_recipe(name)
        check_run_inputs(recipe)
    check_run_inputs(load_recipe("tiny"), tiny_config())
    assert FakeTaskManager.built == []  # offline tasks are known without lm-eval's index
    assert not (tmp_path / "diep-cache").exists()


def test_evaluation_off_skips_the_task_check(tmp_path, no_weights):
    recipe = Recipe.from_dict({**TINY, "evaluation": {"enabled": False, "tasks": ["no_such_task"],
                                                      "perplexity": {"dataset": "wikitext"}}})
    check_run_inputs(recipe)
    assert FakeTaskManager.built == []


def test_a_hub_dataset_in_the_local_cache_is_left_to_the_loader(tmp_path, no_weights, monkeypatch):
    """Offline, a dataset ``datasets`` has cached can still load: preflight does not refuse it."""
    recipe = Recipe.from_dict({"model": {"id": "a/b"}})
    with pytest.raises(ConfigError, match="offline mode is on"):
        check_run_inputs(recipe)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    (Path(datasets.config.HF_DATASETS_CACHE) / "allenai___c4").mkdir(parents=True)
    check_run_inputs(recipe)
    # The switch set after datasets was imported: the loader would refuse, so preflight refuses too.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(ConfigError, match="offline mode is on"):
        check_run_inputs(recipe)


@pytest.mark.slow
def test_unknown_task_against_lm_evals_real_index(monkeypatch):
    """The real TaskManager (indexing ~15k tasks takes tens of seconds): close matches come from it."""
    monkeypatch.setattr(lm_eval_runner, "_MANAGERS", {})
    recipe = Recipe.from_dict({**TINY, "evaluation": {"tasks": ["boolqq", "mmlu"]}})
    with pytest.raises(ConfigError) as info:
        check_run_inputs(recipe)
    message = str(info.value)
    assert "evaluation.tasks" in message and "'boolqq': did you mean 'boolq'" in message and "mmlu" not in message


# ============================================================================ tokenizer of another model
def _wide_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer of 204 ids (the tiny models have 96): its words v92..v199 get ids 96..203."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"v{i}" for i in range(200)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


WIDE_TEXTS = [" ".join(f"v{(d * 37 + j * 11) % 200}" for j in range(30)) for d in range(20)]


@pytest.fixture
def never_scored(monkeypatch):
    """Fail the test if a criterion starts scoring."""
    original = criteria_base.get_criterion

    def guarded(name):
        cls = original(name)

        class Guarded(cls):
            def score(self, context):
                raise AssertionError("scoring started with out-of-vocabulary token ids")

        return Guarded

    monkeypatch.setattr(criteria_base, "get_criterion", guarded)


def _prune_with_wide_tokenizer(ctx):
    model = ctx["model"]
    DiEPPruner(dataset=WIDE_TEXTS, **FAST).prune_model(model, _wide_tokenizer())


def _model_ctx(tmp_path):
    model = tiny_model("mixtral")
    return {"model": model, "before": {k: v.clone() for k, v in model.state_dict().items()}}


def _model_untouched(ctx):
    model = ctx["model"]
    assert all(torch.equal(ctx["before"][k], v) for k, v in model.state_dict().items())
    assert not hasattr(model.config, "diep_pruning")


VOCAB_FAULTS = [
    Fault("prune-model", _model_ctx, _prune_with_wide_tokenizer, ConfigError,
          ["token id", "out of range", "vocabulary size is 96", "ids 0..95", "tokenizer does not belong to this model",
           "calibration text"],
          on_disk=_model_untouched),
    Fault("load-calibration-data", lambda tmp: {},
          lambda ctx: load_calibration_data(WIDE_TEXTS, _wide_tokenizer(), num_samples=4, seq_len=16,
                                            vocab_size=96, progress=False),
          ConfigError, ["token id", "vocabulary size is 96", "a list of 20 strings"]),
    Fault("perplexity", _model_ctx,
          lambda ctx: perplexity(ctx["model"], _wide_tokenizer(), WIDE_TEXTS, num_samples=2, seq_len=16),
          ConfigError, ["token id", "vocabulary size is 96", "perplexity text"], on_disk=_model_untouched),
]


@pytest.mark.parametrize("row", VOCAB_FAULTS, ids=ids(VOCAB_FAULTS))
def test_tokenizer_of_another_model(row, tmp_path, never_scored):
    error = check_fault(row, tmp_path)
    assert "IndexError" not in str(error)


def test_a_matching_tokenizer_still_prunes(never_scored, monkeypatch):
    """The vocabulary check passes in-range ids through: with a tokenizer of the model, scoring starts."""
    with pytest.raises(AssertionError, match="scoring started"):
        DiEPPruner(dataset=pruner_texts(), **FAST).prune_model(tiny_model("mixtral"), pruner_tokenizer())
