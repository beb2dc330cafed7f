"""A criterion declares the selections it supports and the pruner enforces them (NAEE is uniform only).

The bug this guards: NAEE searches the best subset of the uniform size per layer, but global selection then
redistributes removals across layers (s=0.3 on 4 layers x 8 experts: round(9.6) = 10 removed instead of
4 x round(2.4) = 8), so some layer kept a subset NAEE never evaluated.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import yaml

import diep_hub
import diep_hub.calibration
from diep_hub.criteria import available_criteria, get_criterion, selection_problem
from diep_hub.criteria.base import _CRITERIA, COUNTS_BEFORE_SCORING, Criterion, register_criterion
from diep_hub.criteria.capture import block_output, capture_block_inputs, weights_fingerprint
from diep_hub.criteria.naee import NAEECriterion
from diep_hub.errors import ConfigError, DiEPError
from diep_hub.pruner import DiEPPruner
from diep_hub.recipe import RecipeError, load_recipe
from diep_hub.selection import MODES, select_experts, uniform_keep_counts
from tests.helpers.tiny_models import tiny_model
from tests.helpers.word_tokenizer import pruner_texts, pruner_tokenizer

FAST = dict(num_samples=8, seq_len=16, batch_size=4, progress=False)
SPARSITY = 0.3  # 8 experts x 4 layers: uniform removes 2 a layer (8), global would remove round(9.6) = 10

UNSUPPORTED = [(name, mode) for name in available_criteria() for mode in MODES
               if mode not in get_criterion(name).selections]
SUPPORTED = [(name, mode) for name in available_criteria() for mode in get_criterion(name).selections]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pruner(**overrides) -> DiEPPruner:
    return DiEPPruner(**{"dataset": pruner_texts(), **FAST, **overrides})


def _expected_refusal(method: str, mode: str) -> str:
    problem = selection_problem(method, mode)
    assert problem is not None
    return problem


# ------------------------------------------------------------------------------------------------------------
# The reproduction: s=0.3, tiny Mixtral with 8 experts in each of 4 layers.
def test_naee_keeps_exactly_its_best_evaluated_subset_in_every_layer(calibration_calls):
    original = tiny_model("mixtral")
    layers = diep_hub.get_family(original).moe_layers(original)
    assert [layer.num_experts for layer in layers] == [8, 8, 8, 8]
    pruner = _pruner(sparsity=SPARSITY, method="naee")  # selection unset: naee's default
    assert pruner.selection == "uniform"
    model = pruner.prune_model(copy.deepcopy(original), pruner_tokenizer())
    report = pruner.report
    details = report["details"]
    assert report["selection"] == "uniform" and model.config.diep_pruning["selection"] == "uniform"
    assert (report["num_removed"], report["num_total"]) == (8, 32)
    assert model.config.num_experts_per_layer == [6, 6, 6, 6]
    (ids,) = calibration_calls
    pruned_layers = diep_hub.get_family(model).moe_layers(model)
    for layer, pruned in zip(layers, pruned_layers, strict=True):
        key = str(layer.index)
        kept = report["kept_ids"][key]
        # The kept set is the subset NAEE recorded as best, among the C(8, 6) it evaluated...
        assert kept == details["kept"][key]
        assert details["subsets"][key] == math.comb(8, 6)
        # ...and the pruned block's real error on the inputs NAEE saw (from the unpruned model) is the error
        # NAEE recorded for its best subset: the keep map is the evaluated subset, not a neighbour of it.
        inputs = capture_block_inputs(original, layer, ids, FAST["batch_size"], progress=False)
        with torch.no_grad():
            squared = sum(
                float(((block_output(pruned.block, h) - block_output(layer.block, h)) ** 2).sum()) for h in inputs
            )
        assert math.sqrt(squared) == pytest.approx(details["best_error"][key], rel=1e-4, abs=1e-6)
    # The scenario does reproduce the bug: global selection on the same scores keeps other subsets.
    scores = {int(i): torch.tensor(v) for i, v in report["scores"].items()}
    old = select_experts(scores, original, sparsity=SPARSITY, mode="global")
    assert old.num_removed == 10
    assert any(old.keep[int(i)] != kept for i, kept in details["kept"].items())
    assert min(old.per_layer_kept.values()) < 6


def test_naee_with_global_selection_is_refused_naming_both_and_the_allowed_one(calibration_calls):
    expected = (
        "invalid DiEPPruner configuration: selection: 'global' -> method='naee' does not support "
        "selection='global' (naee searches the "
        "best subset of a fixed size per layer, the uniform counts; global selection would change those counts "
        "after the search and keep subsets naee never evaluated); allowed with naee: selection='uniform'"
    )
    with pytest.raises(ConfigError) as info:
        _pruner(sparsity=SPARSITY, method="naee", selection="global")
    assert str(info.value) == expected
    # A field reassigned after construction is caught before calibration too, and the model is left untouched.
    pruner = _pruner(sparsity=SPARSITY, method="naee")
    pruner.selection = "global"
    model = tiny_model("mixtral")
    before = weights_fingerprint(model)
    with pytest.raises(ConfigError) as info:
        pruner.prune_model(model, pruner_tokenizer())
    assert str(info.value) == expected
    assert calibration_calls == []
    after = weights_fingerprint(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_keep_map_with_other_counts_than_the_search_is_refused_before_surgery(monkeypatch, calibration_calls):
    """The pruner's last guard, on the old code path: naee allowed with global selection and told the uniform
    counts (what the pruner did before the declaration). The keep map, with other per-layer counts than those
    searched, is refused instead of applied."""
    model = tiny_model("mixtral")
    uniform = uniform_keep_counts(model, sparsity=SPARSITY)
    assert uniform == {0: 6, 1: 6, 2: 6, 3: 6}
    monkeypatch.setattr(NAEECriterion, "selections", ("uniform", "global"))
    monkeypatch.setattr(DiEPPruner, "_target_counts", lambda self, dry_run: dict(uniform))
    pruner = _pruner(sparsity=SPARSITY, method="naee", selection="global")
    before = weights_fingerprint(model)
    with pytest.raises(DiEPError, match=r"naee scored subsets of sizes \{0: 6, 1: 6, 2: 6, 3: 6\} per layer but "
                                        r"global selection keeps \{.*\}; refusing a keep map"):
        pruner.prune_model(model, pruner_tokenizer())
    assert len(calibration_calls) == 1  # it did score: the guard is after the search, before surgery
    after = weights_fingerprint(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert diep_hub.get_family(model).moe_layers(model)[0].num_experts == 8


# ------------------------------------------------------------------------------------------------------------
# Declarations
@pytest.mark.parametrize("name", available_criteria())
def test_every_registered_criterion_declares_valid_selections(name):
    cls = get_criterion(name)
    declared = cls.selections
    assert isinstance(declared, tuple) and declared and len(set(declared)) == len(declared)
    assert set(declared) <= set(MODES)
    assert cls.default_selection() == declared[0]
    if cls.needs_target_counts:
        assert set(declared) <= set(COUNTS_BEFORE_SCORING)
    if set(declared) != set(MODES):
        assert cls.selection_reason, f"{name} leaves out {set(MODES) - set(declared)} without saying why"
    # An unset selection resolves to the declared default, in the API and in a recipe alike.
    assert DiEPPruner(method=name).selection == declared[0]


def test_the_declarations_are_what_the_methods_need():
    assert get_criterion("naee").selections == ("uniform",)
    for name in ("diep", "reap", "frequency", "soft_frequency", "random"):
        assert get_criterion(name).selections == ("global", "uniform"), name
    assert ("naee", "global") in UNSUPPORTED


def _criterion(name: str, **attrs) -> type[Criterion]:
    namespace = {"name": name, "score": lambda self, context: None, **attrs}
    return type(f"Test{name}", (Criterion,), namespace)


@pytest.mark.parametrize(
    "attrs, expected",
    [
        ({"selections": ()}, r"declares selections=\(\); expected a non-empty tuple of distinct modes"),
        ({"selections": ("best",)}, r"declares selections=\('best',\); expected .* from \['global', 'uniform'\]"),
        ({"selections": ["uniform"]}, r"declares selections=\['uniform'\]; expected a non-empty tuple"),
        ({"selections": ("uniform", "uniform")}, r"expected a non-empty tuple of distinct modes"),
        ({"needs_target_counts": True},
         r"searches subsets of given sizes \(needs_target_counts\) but declares selections=\('global', 'uniform'\); "
         r"only \['uniform'\] fix the per-layer counts before scoring"),
    ],
    ids=["empty", "unknown-mode", "list", "duplicate", "target-counts-with-global"],
)
def test_registration_refuses_a_bad_declaration(attrs, expected):
    before = dict(_CRITERIA)
    with pytest.raises(ValueError, match=expected):
        register_criterion(_criterion("selection_probe", **attrs))
    assert _CRITERIA == before


# ------------------------------------------------------------------------------------------------------------
# The same refusal through the API and a recipe file
def _recipe_file(tmp_path, method: str, selection: str | None):
    pruning = {"method": method, "sparsity": SPARSITY}
    if selection is not None:
        pruning["selection"] = selection
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"id": "diep-hub/tiny-mixtral"}, "pruning": pruning}), encoding="utf-8")
    return path


@pytest.mark.parametrize(("method", "mode"), UNSUPPORTED, ids=[f"{m}-{s}" for m, s in UNSUPPORTED])
def test_unsupported_selection_is_refused_with_one_message_by_api_and_recipe(tmp_path, method, mode):
    problem = _expected_refusal(method, mode)
    assert f"method={method!r}" in problem and f"selection={mode!r}" in problem
    allowed = get_criterion(method).selections
    assert problem.endswith(f"allowed with {method}: " + ", ".join(f"selection={m!r}" for m in allowed))
    with pytest.raises(ConfigError) as api:
        DiEPPruner(sparsity=SPARSITY, method=method, selection=mode)
    assert str(api.value) == f"invalid DiEPPruner configuration: selection: {mode!r} -> {problem}"
    path = _recipe_file(tmp_path, method, mode)
    with pytest.raises(RecipeError) as recipe:
        load_recipe(path)
    (line_problem,) = recipe.value.problems  # the same words, then where in the file
    assert re.fullmatch(re.escape(f"pruning.selection: {mode!r} -> {problem}") + r" \(line \d+\)", line_problem)
    assert str(path) in str(recipe.value)


@pytest.mark.parametrize(("method", "mode"), SUPPORTED, ids=[f"{m}-{s}" for m, s in SUPPORTED])
def test_supported_selection_passes_through_recipe_and_api(tmp_path, method, mode):
    assert selection_problem(method, mode) is None
    recipe = load_recipe(_recipe_file(tmp_path, method, mode))
    assert recipe.pruning.selection == mode
    assert DiEPPruner(**recipe.to_pruner_kwargs()).selection == mode


@pytest.mark.parametrize("unset", ["missing", "null"])
@pytest.mark.parametrize("method", available_criteria())
def test_an_unset_recipe_selection_is_the_methods_default(tmp_path, method, unset):
    path = _recipe_file(tmp_path, method, None)
    if unset == "null":
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["pruning"]["selection"] = None
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
    recipe = load_recipe(path)
    default = get_criterion(method).selections[0]
    assert recipe.pruning.selection == default
    assert DiEPPruner(**recipe.to_pruner_kwargs()).selection == default
    # What is saved beside a checkpoint names the resolved mode, so the run reproduces without the default.
    assert yaml.safe_load(recipe.to_yaml())["pruning"]["selection"] == default
    # The recipe's resolution and the API's agree.
    assert DiEPPruner(method=method).selection == default
