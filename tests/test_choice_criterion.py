"""validated_choice (criteria/choice.py): it judges each candidate's keep map as surgery would route it, keeps the
one with the lowest held-out KL, and the pruner applies exactly that keep map.

The masked KL is compared with the KL of the surgically pruned model (two computations of the same maths: in
float64, to a relative 1e-6); the keep maps, the choice and the candidates' scores are compared exactly
(the same computation on the same tokens).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml

import diep_hub
from diep_hub.criteria.base import get_criterion
from diep_hub.criteria.choice import masked_kl, split_calibration
from diep_hub.errors import ConfigError
from diep_hub.families import get_family
from diep_hub.pruner import DiEPPruner
from diep_hub.selection import select_experts
from tests.helpers.pruning import fast_pruner
from tests.helpers.scoring import scoring_context
from tests.helpers.tiny_models import FAMILIES, sample_input_ids, tiny_model
from tests.helpers.word_tokenizer import pruner_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GROUPED = {"deepseek_v3": {"n_group": 2, "topk_group": 1}}


def _kl_after_surgery(model, keep, ids) -> float:
    """Mean per-token KL(unpruned || surgically pruned): the reference the masked KL must match."""
    pruned = diep_hub.prune_experts(copy.deepcopy(model), keep)
    pruned.config._experts_implementation = model.config._experts_implementation
    with torch.no_grad():
        reference = torch.log_softmax(model(ids).logits, dim=-1)
        after = torch.log_softmax(pruned(ids).logits, dim=-1)
    return float((reference.exp() * (reference - after)).sum() / (ids.shape[0] * ids.shape[1]))


def _selection(model, sparsity, mode="global"):
    return lambda scores: select_experts(scores, model, sparsity=sparsity, mode=mode)


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_kl_is_the_kl_of_the_surgically_pruned_model(family):
    # float64: the KL of a tiny random model is ~1e-5, and float32 rounding of the logits would blur it; in float64
    # the two routes to the same routing agree to ~1e-12 of it, so a relative 1e-6 can only fail on a real difference.
    model = tiny_model(family, **GROUPED.get(family, {})).double()
    model.config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    layers = get_family(model).moe_layers(model)
    ids = sample_input_ids(batch=3, length=11)
    scores = {layer.index: torch.randn(layer.num_experts, generator=torch.Generator().manual_seed(layer.index))
              for layer in layers}
    keep = _selection(model, 0.5)(scores).keep
    assert all(len(keep[layer.index]) < layer.num_experts for layer in layers)

    (masked,) = masked_kl(model, layers, [keep], ids, batch_size=2)
    expected = _kl_after_surgery(model, keep, ids)
    assert expected > 1e-7  # removing half the experts moves the model: the comparison can fail
    assert masked == pytest.approx(expected, rel=1e-6, abs=0.0)
    # Nothing removed: the masked model is the unpruned one.
    everything = {layer.index: list(range(layer.num_experts)) for layer in layers}
    assert masked_kl(model, layers, [everything], ids, batch_size=2)[0] == pytest.approx(0.0, abs=1e-12)


def _choice(model, ids, sparsity=0.5, mode="global", **options):
    context = scoring_context(model, ids, batch_size=4, sparsity=sparsity, options=options)
    context.select = _selection(model, sparsity, mode)
    return get_criterion("validated_choice")().score(context), context


@pytest.mark.parametrize("mode", ["global", "uniform"])
def test_the_chosen_candidate_has_the_lowest_held_out_kl_and_its_fit_scores(mode):
    model = tiny_model("qwen2_moe")
    ids = sample_input_ids(batch=8, length=12, seed=3)
    candidates = ["reap", "frequency", "random"]
    result, context = _choice(model, ids, mode=mode, candidates=candidates, validation_fraction=0.25)
    fit, held_out = ids[:6], ids[6:]

    details = result.details
    assert (details["fit_sequences"], details["validation_sequences"]) == (6, 2)
    keep_maps, own_scores = [], {}
    for name in candidates:
        own = get_criterion(name)().score(scoring_context(model, fit, batch_size=4, sparsity=0.5))
        own_scores[name] = own.scores
        keep_maps.append(context.select(own.scores).keep)
        counts = {str(k): len(v) for k, v in sorted(keep_maps[-1].items())}
        assert details["candidates"][name]["per_layer_kept"] == counts
    kls = masked_kl(model, context.layers, keep_maps, held_out, batch_size=4)
    assert [details["candidates"][n]["validation_kl"] for n in candidates] == kls
    chosen = candidates[min(range(3), key=lambda i: (kls[i], i))]
    assert details["chosen"] == chosen
    for index, tensor in result.scores.items():
        assert torch.equal(tensor, own_scores[chosen][index])
    # The candidates disagree somewhere (else the test could not tell a wrong choice from a right one).
    assert len({tuple(map(tuple, k.values())) for k in keep_maps}) > 1


def test_the_pruner_applies_the_validated_keep_map_and_reports_the_choice():
    tokenizer = pruner_tokenizer()
    pruner = fast_pruner(sparsity=0.5, method="validated_choice",
                         options={"candidates": ["frequency", "reap", "random"], "validation_fraction": 0.5})
    base = tiny_model("mixtral")
    model = pruner.prune_model(copy.deepcopy(base), tokenizer)

    report = pruner.report
    chosen = report.details["chosen"]
    assert chosen in ("frequency", "reap", "random")
    assert set(report.details["candidates"]) == {"frequency", "reap", "random"}
    assert report.method == "validated_choice" and report.ranking.startswith(chosen)
    # Rebuild what the chosen candidate saw: the first half of the same calibration tokens.
    from diep_hub.calibration import load_calibration_data

    ids = load_calibration_data(pruner.dataset, tokenizer, num_samples=8, seq_len=16, seed=0)
    fit = split_calibration(ids, 0.5)[0]
    scores = get_criterion(chosen)().score(scoring_context(base, fit, batch_size=4, sparsity=0.5)).scores
    expected = select_experts(scores, base, sparsity=0.5, mode="global").keep
    assert report.kept_original_ids == expected
    assert report.per_layer_kept == {k: len(v) for k, v in expected.items()}
    for k, ids_kept in expected.items():  # surgery kept exactly those experts' weights
        layer = get_family(model).moe_layers(model)[k].experts
        assert torch.equal(layer.down_proj, get_family(base).moe_layers(base)[k].experts.down_proj[ids_kept])


@pytest.mark.parametrize(
    "options, words",
    [
        ({"candidates": ["reap", "nonsense"]}, "nonsense"),
        ({"candidates": ["reap", "reap"]}, "twice"),
        ({"candidates": ["validated_choice"]}, "validated_choice"),
        ({"candidates": ["naee", "reap"]}, "naee"),
        ({"candidates": []}, "non-empty"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
    ],
)
def test_bad_options_are_refused_by_name_when_the_pruner_is_made(options, words):
    with pytest.raises(ConfigError, match=words):
        fast_pruner(method="validated_choice", options=options)


def test_recipe_options_reach_the_criterion_as_typed_values(tmp_path):
    from diep_hub.criteria.choice import ChoiceOptions
    from diep_hub.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"id": "diep-hub/tiny-mixtral"},
                                    "pruning": {"method": "validated_choice",
                                                "options": {"candidates": ["soft_frequency", "reap"],
                                                            "validation_fraction": 0.5}}}), encoding="utf-8")
    settings = DiEPPruner(**load_recipe(path).to_pruner_kwargs()).criterion_settings()
    assert settings == ChoiceOptions(candidates=("soft_frequency", "reap"), validation_fraction=0.5)
    assert ChoiceOptions().candidates == ("reap", "frequency", "soft_frequency")


def test_too_few_sequences_to_split_is_refused():
    with pytest.raises(ConfigError, match="num_samples=1"):
        split_calibration(torch.zeros(1, 4, dtype=torch.long), 0.25)
    fit, held_out = split_calibration(torch.arange(10).reshape(5, 2), 0.25)
    assert fit.shape[0] == 3 and torch.equal(held_out, torch.arange(6, 10).reshape(2, 2))


def test_regrouped_selection_is_refused_before_calibration():
    model = tiny_model("deepseek_v3", n_group=2, topk_group=1)
    pruner = fast_pruner(sparsity=0.25, method="validated_choice", regroup=True, dataset=["never read"])
    with pytest.raises(ConfigError, match="regroup"):
        pruner.prepare_scoring(model)


def test_dry_run_counts_every_candidate_pass_and_the_judging_passes():
    from diep_hub.criteria.removal import RemovalOptions
    from diep_hub.dry_run import _search_passes

    # three one-pass candidates on 75% of the tokens, then the unpruned model and three masked ones on 25%
    assert _search_passes(DiEPPruner(method="validated_choice")) == 4  # ceil(3 * 0.75 + 4 * 0.25)
    epochs = RemovalOptions().epochs
    pruner = DiEPPruner(method="validated_choice",
                        options={"candidates": ["reap", "diep_removal"], "validation_fraction": 0.5})
    assert _search_passes(pruner) == math.ceil((1 + 1 + 3 * epochs) * 0.5 + 3 * 0.5)
