"""One value, one verdict, one message: the Python API, a recipe file and ``diep-hub prune`` refuse the same bad
value with the same words (the field, the value, what is allowed), one field of each kind: a range, a type, a
choice. The three validate with the same models (``diep_hub.options``); this table proves they also say so alike.

Each surface names the field its own way (``lr=`` keyword, ``pruning.search.lr`` recipe path, ``--lr`` flag), so the
shared text is ``<name>: <value> -> <what is allowed>`` where the three spellings end alike, and from the value on
where they do not (``seq_len`` / ``--seq-len``); each message is also compared in full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from diep_hub.criteria import available_criteria
from diep_hub.errors import ConfigError
from diep_hub.options import quoted_choices
from diep_hub.pruner import DiEPPruner
from diep_hub.recipe import RecipeError, load_recipe
from tests.helpers.fault_catalogue import CliFault, check_cli_fault


@dataclass(frozen=True)
class Same:
    """One bad value: the DiEPPruner keyword, the recipe field, the CLI flag and its text, the shared words."""

    id: str
    keyword: str
    recipe_path: str  # under pruning:
    flag: str
    value: Any
    text: str  # the value as typed on the command line
    shared: str  # exactly this substring in all three messages

    def __str__(self) -> str:
        return self.id


METHODS = quoted_choices(available_criteria())
ROWS = [
    # a range
    Same("range-sparsity-1.5", "sparsity", "sparsity", "--sparsity", 1.5, "1.5",
         "sparsity: 1.5 -> is out of range; allowed: (0, 1)"),
    Same("range-sparsity-0", "sparsity", "sparsity", "--sparsity", 0, "0",
         "sparsity: 0 -> is out of range; allowed: (0, 1)"),  # refused everywhere: 0 < sparsity < 1
    Same("range-sparsity-nan", "sparsity", "sparsity", "--sparsity", math.nan, "nan",
         "sparsity: nan -> must be a finite number in (0, 1)"),
    Same("range-lr-inf", "lr", "search.lr", "--lr", math.inf, "inf",
         "lr: inf -> must be a finite number in (0, inf)"),
    Same("range-seq-len-1", "seq_len", "calibration.seq_len", "--seq-len", 1, "1",
         "1 -> is out of range; allowed: [2, inf)"),  # seq_len / --seq-len: the name differs by its hyphen
    # a type
    Same("type-epochs-ten", "epochs", "search.epochs", "--epochs", "ten", "ten",
         "epochs: 'ten' -> must be an integer in [1, inf)"),
    Same("type-epochs-2.5", "epochs", "search.epochs", "--epochs", 2.5, "2.5",
         "epochs: 2.5 -> must be an integer in [1, inf)"),
    Same("type-batch-size-half", "batch_size", "search.batch_size", "--batch-size", "half", "half",
         "'half' -> must be an integer in [1, inf)"),
    # a choice
    Same("choice-method", "method", "method", "--method", "nope", "nope",
         f"method: 'nope' -> Input should be {METHODS} (a registered criterion)"),
    Same("choice-search-mode", "search_mode", "search.mode", "--search-mode", "x", "x",
         "mode: 'x' -> Input should be 'auto', 'gated' or 'dense'"),
    Same("choice-selection", "selection", "selection", "--selection", "sideways", "sideways",
         "selection: 'sideways' -> Input should be 'global' or 'uniform'"),
]


def _recipe(tmp_path, row: Same):
    pruning: dict[str, Any] = {}
    *sections, key = row.recipe_path.split(".")
    node = pruning
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = row.value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"id": "diep-hub/tiny-mixtral"}, "pruning": pruning}), encoding="utf-8")
    return path


def _line_of_key(path, key: str) -> str:
    """`` (line N)``: the line of the first ``key:`` in the recipe file, as a recipe problem ends."""
    lines = path.read_text().splitlines()
    return f" (line {next(i for i, text in enumerate(lines, 1) if text.strip().startswith(key + ':'))})"


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_api_recipe_and_cli_give_the_same_message(row, tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as api:
        DiEPPruner(**{row.keyword: row.value})
    api_message = str(api.value)
    assert api_message == f"invalid DiEPPruner configuration: {row.keyword}: {row.value!r} -> " + (
        row.shared.split(" -> ", 1)[1]
    )
    assert row.shared in api_message

    with pytest.raises(RecipeError) as recipe:
        load_recipe(path := _recipe(tmp_path, row))
    (line,) = recipe.value.problems
    where = _line_of_key(path, row.recipe_path.split(".")[-1])
    assert line == f"pruning.{row.recipe_path}: {row.value!r} -> " + row.shared.split(" -> ", 1)[1] + where
    assert row.shared in line

    out = tmp_path / "out"
    cli = CliFault(
        id=row.id,
        setup=lambda tmp: {},
        argv=lambda ctx: ["prune", "diep-hub/tiny-mixtral", "--output", str(out), row.flag, row.text],
        words=[f"{row.flag}: ", row.shared],
        on_disk=lambda ctx: None,
    )
    result = check_cli_fault(cli, tmp_path, monkeypatch)
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("diep-hub prune: error:")]
    assert error == f"diep-hub prune: error: invalid options (1 problem(s)): {row.flag}: {row.value!r} -> " + (
        row.shared.split(" -> ", 1)[1]
    )
    assert not out.exists()


def test_every_problem_of_a_command_line_is_named_by_its_flag(tmp_path, monkeypatch):
    cli = CliFault(
        id="two-flags",
        setup=lambda tmp: {},
        argv=lambda ctx: ["prune", "m", "--output", str(tmp_path / "o"), "--sparsity", "2", "--epochs", "0"],
        words=["invalid options (2 problem(s)): --sparsity: 2 -> is out of range; allowed: (0, 1); "
               "--epochs: 0 -> is out of range; allowed: [1, inf)"],
    )
    check_cli_fault(cli, tmp_path, monkeypatch)


# A criterion with no keywords of its own (diep_removal) takes its options as a mapping: DiEPPruner(options=...),
# the recipe's pruning.options and `prune --option KEY=VALUE`, checked against its options model in one wording.
REMOVAL_SHARED = "options.lr: -1 -> is out of range; allowed: (0, inf)"


def test_a_criterion_options_mapping_gets_one_message_from_api_recipe_and_cli(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as api:
        DiEPPruner(method="diep_removal", options={"lr": -1})
    assert str(api.value) == f"invalid DiEPPruner configuration: {REMOVAL_SHARED}"

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"id": "diep-hub/tiny-mixtral"},
                                    "pruning": {"method": "diep_removal", "options": {"lr": -1}}}), encoding="utf-8")
    with pytest.raises(RecipeError) as recipe:
        load_recipe(path)
    (line,) = recipe.value.problems
    assert line == f"pruning.options: {{'lr': -1}} -> {REMOVAL_SHARED}" + _line_of_key(path, "options")

    out = tmp_path / "out"
    cli = CliFault(
        id="removal-option",
        setup=lambda tmp: {},
        argv=lambda ctx: ["prune", "diep-hub/tiny-mixtral", "--output", str(out), "--method", "diep_removal",
                          "--option", "lr=-1"],
        words=["--option: ", REMOVAL_SHARED],
        on_disk=lambda ctx: None,
    )
    result = check_cli_fault(cli, tmp_path, monkeypatch)
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("diep-hub prune: error:")]
    assert error == f"diep-hub prune: error: invalid options (1 problem(s)): --option: {{'lr': -1}} -> {REMOVAL_SHARED}"
    assert not out.exists()


def test_recipe_options_reach_the_criterion_as_typed_values(tmp_path):
    from diep_hub.criteria.removal import RemovalOptions

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"id": "diep-hub/tiny-mixtral"},
                                    "pruning": {"method": "diep_removal", "options": {"lr": 0.5, "masks": 8}}}),
                    encoding="utf-8")
    kwargs = load_recipe(path).to_pruner_kwargs()
    assert kwargs["options"] == {"lr": 0.5, "masks": 8}
    settings = DiEPPruner(**kwargs).criterion_settings()
    assert settings == RemovalOptions(lr=0.5, masks=8)
    assert DiEPPruner(**kwargs).criterion_options()["masks"] == 8


@pytest.mark.parametrize(("flag", "message"), [
    ("lr", "--option: 'lr' -> expected KEY=VALUE, e.g. --option lr=0.5"),
    ("=3", "--option: '=3' -> expected KEY=VALUE, e.g. --option lr=0.5"),
    ("bogus=1", "--option: {'bogus': 1} -> options.bogus: unknown key -> allowed keys: estimator, epochs, lr"),
])
def test_a_malformed_or_unknown_option_flag_is_one_line(flag, message, tmp_path, monkeypatch):
    cli = CliFault(
        id="option-flag",
        setup=lambda tmp: {},
        argv=lambda ctx: ["prune", "diep-hub/tiny-mixtral", "--output", str(tmp_path / "o"), "--method",
                          "diep_removal", "--option", flag],
        words=[message],
    )
    check_cli_fault(cli, tmp_path, monkeypatch)
