"""Fault catalogue of recipe values, before any work (tests/helpers/fault_catalogue.py rows):

- RECIPE_FAULTS: ``load_recipe`` on duplicated keys, non-UTF-8 bytes, malformed YAML, a top level that is not a
  mapping, and non-finite or out-of-range numbers, named by their recipe field (never the pruner's Python name);
- NUMBER_FAULTS: every numeric recipe field with NaN and inf -> ``field: ... must be a finite number``;
- PRUNER_FAULTS: ``DiEPPruner(...)`` with sparsity 0, NaN and inf learning rates;
- SAME_MESSAGE and a property test: the recipe and the pruner accept the same values, with the same message.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diep_hub.errors import ConfigError, CorruptFileError
from diep_hub.pruner import DiEPPruner
from diep_hub.recipe import Recipe, RecipeError, load_recipe
from tests.helpers.fault_catalogue import Fault, check_fault, ids


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
