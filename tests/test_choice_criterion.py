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

from diep_hub.criteria.base import get_criterion
from diep_hub.criteria.choice import masked_kl, split_calibration
from diep_hub.errors import ConfigError
from diep_hub.families import get_family
from diep_hub.pruner import DiEPPruner
from diep_hub.selection import select_experts
from tests.helpers.pruning import fast_pruner, surgically_pruned
from tests.helpers.scoring import scoring_context
from tests.helpers.tiny_models import FAMILIES, float64_tiny_model, sample_input_ids, tiny_model
from tests.helpers.word_tokenizer import pruner_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GROUPED = {"deepseek_v3": {"n_group": 2, "topk_group": 1}}


def _kl_after_surgery(model, keep, ids) -> float:
    """Mean per-token KL(unpruned || surgically pruned): the reference the masked KL must match."""
    pruned = surgically_pruned(model, keep)
    with torch.no_grad():
        reference = torch.log_softmax(model(ids).logits, dim=-1)
        after = torch.log_softmax(pruned(ids).logits, dim=-1)
    return float((reference.exp() * (reference - after)).sum() / (ids.shape[0] * ids.shape[1]))


def _selection(model, sparsity, mode="global"):
    """A run's selection as DiEPPruner gives it to the criterion (``mode=`` overrides the run's mode)."""
    return lambda scores, mode=mode: select_experts(scores, model, sparsity=sparsity, mode=mode)


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_kl_is_the_kl_of_the_surgically_pruned_model(family):
    # float64: the KL of a tiny random model is ~1e-5, and float32 rounding of the logits would blur it; in float64
    # the two routes to the same routing agree to ~1e-12 of it, so a relative 1e-6 can only fail on a real difference.
    model = float64_tiny_model(family, **GROUPED.get(family, {}))
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
    result, context = _choice(model, ids, mode=mode, candidates=candidates, validation_fraction=0.25,
                              refine_rounds=0, compare_uniform=False)
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
                         options={"candidates": ["frequency", "reap", "random"], "validation_fraction": 0.5,
                                  "refine_rounds": 0, "compare_uniform": False})
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
        ({"refine_rounds": -1}, r"refine_rounds: -1 -> is out of range; allowed: \[0, inf\)"),
        ({"refine_sequences": 0}, r"refine_sequences: 0 -> is out of range; allowed: \[1, inf\)"),
        ({"compare_uniform": "maybe"}, "compare_uniform: 'maybe'"),
        ({"refine_candidates": 0}, r"refine_candidates: 0 -> is out of range; allowed: \[1, inf\)"),
        ({"min_gain_se": -1}, r"min_gain_se: -1 -> is out of range; allowed: \[0, inf\)"),
        ({"cache_mb": -1}, r"cache_mb: -1 -> is out of range; allowed: \[0, inf\)"),
        ({"probe_width": -1}, r"probe_width: -1 -> is out of range; allowed: \[0, inf\)"),
        ({"min_move_gain_se": -1}, r"min_move_gain_se: -1 -> is out of range; allowed: \[0, inf\)"),
        ({"refine_budget": -1}, r"refine_budget: -1 -> is out of range; allowed: \[0, inf\)"),
        ({"refine_objective": "ce"}, "refine_objective: 'ce'"),
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

    # three routing-statistic candidates share one pass on 75% of the tokens, then the unpruned model and three
    # masked ones on 25%
    unrefined = DiEPPruner(method="validated_choice", options={"refine_rounds": 0, "compare_uniform": False})
    assert _search_passes(unrefined) == 2  # ceil(0.75 + 4 * 0.25)
    # with global selection each candidate's uniform keep map may be judged too: 3 more held-out passes at most
    half = {"refine_rounds": 0, "validation_fraction": 0.5, "compare_uniform": True}
    assert _search_passes(DiEPPruner(method="validated_choice", options=half)) == 4  # 0.5 + 7 * 0.5
    uniform = DiEPPruner(method="validated_choice", selection="uniform", options=half)
    assert _search_passes(uniform) == 3  # ceil(0.5 + 4 * 0.5)
    epochs = RemovalOptions().epochs
    pruner = DiEPPruner(method="validated_choice",
                        options={"candidates": ["reap", "diep_removal"], "validation_fraction": 0.5,
                                 "refine_rounds": 0, "compare_uniform": False})
    assert _search_passes(pruner) == math.ceil((1 + 1 + 3 * epochs) * 0.5 + 3 * 0.5)
    # refinement: 2 passes, then (2 probes a layer + 5) a round, over 16 of 64 sequences; 2 held-out passes (no
    # budget of passes here: the bounded count is checked below)
    refining = DiEPPruner(method="validated_choice", num_samples=64,
                          options={"candidates": ["reap"], "refine_rounds": 4, "refine_sequences": 16,
                                   "compare_uniform": False, "refine_budget": 0})
    assert _search_passes(refining, num_moe_layers=6) == math.ceil(
        0.75 + 2 * 0.25 + (16 / 64) * (2 + 4 * (2 * 6 + 5)) + 2 * 0.25)
    # wider probes: 2 x probe_width a layer, at most the layer's experts (all of them with probe_width=0)
    for width, experts, probes in [(4, 16, 8), (0, 16, 16), (4, 6, 6), (1, 16, 2)]:
        wide = DiEPPruner(method="validated_choice", num_samples=64,
                          options={"candidates": ["reap"], "refine_rounds": 4, "refine_sequences": 16,
                                   "compare_uniform": False, "probe_width": width, "refine_budget": 0})
        assert _search_passes(wide, num_moe_layers=6, experts_per_layer=experts) == math.ceil(
            0.75 + 2 * 0.25 + (16 / 64) * (2 + 4 * (probes * 6 + 5)) + 2 * 0.25), (width, experts)
    # refine_budget bounds all refinements together: 16 x 8 probes a layer x 6 layers of 64 sequences' passes would
    # be 26.75 calibration passes; a budget of 3 leaves 3 + one unpruned pass over the 16 refine sequences
    bounded = DiEPPruner(method="validated_choice", num_samples=64,
                         options={"candidates": ["reap"], "refine_rounds": 4, "refine_sequences": 16,
                                  "compare_uniform": False, "refine_budget": 3})
    assert _search_passes(bounded, num_moe_layers=6, experts_per_layer=16) == math.ceil(
        0.75 + 2 * 0.25 + min((16 / 64) * (2 + 4 * (8 * 6 + 5)), 3 + 16 / 64) + 2 * 0.25)
    # refining the best two of three judged keep maps doubles the refinement's passes
    two = DiEPPruner(method="validated_choice", num_samples=64,
                     options={"refine_rounds": 4, "refine_sequences": 16, "refine_candidates": 2,
                              "compare_uniform": False, "refine_budget": 0})
    assert _search_passes(two, num_moe_layers=6) == math.ceil(
        0.75 + 4 * 0.25 + 2 * ((16 / 64) * (2 + 4 * (2 * 6 + 5)) + 2 * 0.25))
    # more than are judged: each judged keep map is refined once
    many = DiEPPruner(method="validated_choice", num_samples=64,
                      options={"candidates": ["reap"], "refine_rounds": 4, "refine_sequences": 16,
                               "refine_candidates": 5, "compare_uniform": False, "refine_budget": 0})
    assert _search_passes(many, num_moe_layers=6) == _search_passes(refining, num_moe_layers=6)
    # refine_objective="nll": the keep maps refined are measured again by the held-out NLL (the winner's: one pass
    # on 25%; the best two of three judged with refine_candidates=2: two)
    by_nll = DiEPPruner(method="validated_choice", num_samples=64,
                        options={"refine_rounds": 4, "refine_sequences": 16, "compare_uniform": False,
                                 "refine_budget": 0, "refine_objective": "nll"})
    assert _search_passes(by_nll, num_moe_layers=6) == math.ceil(
        0.75 + 4 * 0.25 + (16 / 64) * (2 + 4 * (2 * 6 + 5)) + 2 * 0.25 + 1 * 0.25)
    two_by_nll = DiEPPruner(method="validated_choice", num_samples=64,
                            options={"refine_rounds": 4, "refine_sequences": 16, "compare_uniform": False,
                                     "refine_budget": 0, "refine_objective": "nll", "refine_candidates": 2})
    assert _search_passes(two_by_nll, num_moe_layers=6) == math.ceil(
        0.75 + 4 * 0.25 + 2 * ((16 / 64) * (2 + 4 * (2 * 6 + 5)) + 2 * 0.25) + 2 * 0.25)


def test_dry_run_counts_the_caches_in_the_peak():
    from types import SimpleNamespace

    from diep_hub.dry_run import _cache_bytes

    text = SimpleNamespace(vocab_size=1000, hidden_size=64)
    pruner = DiEPPruner(method="validated_choice", num_samples=64, seq_len=32,
                        options={"refine_sequences": 16, "cache_mb": 1024})
    logprobs = 32 * 1000 * 4  # a sequence's float32 log-probabilities
    outputs = 32 * 64 * 2 * (6 - 1)  # a refine sequence's outputs of all decoder layers but the last, bf16
    # 16 held-out sequences (ceil(0.25 x 64)) for the judging; 16 refine sequences and their layer outputs
    assert _cache_bytes(pruner, text, 6, 2) == 16 * logprobs + 16 * (logprobs + outputs)
    small = DiEPPruner(method="validated_choice", num_samples=64, seq_len=32, options={"cache_mb": 1})
    assert _cache_bytes(small, text, 6, 2) == min(2**19, 16 * logprobs) + min(2**19, 16 * (logprobs + outputs))
    assert _cache_bytes(DiEPPruner(method="validated_choice", options={"cache_mb": 0}), text, 6, 2) == 0
    assert _cache_bytes(DiEPPruner(method="reap"), text, 6, 2) == 0
    unrefined = DiEPPruner(method="validated_choice", num_samples=64, seq_len=32, options={"refine_rounds": 0})
    assert _cache_bytes(unrefined, text, 6, 2) == 16 * logprobs


# ------------------------------------------------------------------------------------------------ refinement
@pytest.mark.parametrize("family, mode", [("mixtral", "global"), ("mixtral", "uniform"), ("deepseek_v3", "global")])
def test_keep_map_scores_rebuild_the_keep_map_under_the_runs_selection(family, mode):
    from diep_hub.criteria.refinement import keep_map_scores

    model = tiny_model(family, **GROUPED.get(family, {}))
    layers = get_family(model).moe_layers(model)
    select = _selection(model, 0.5, mode)
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        original = {layer.index: torch.randn(layer.num_experts, generator=generator) for layer in layers}
        keep = select(original).keep
        # other scores (a reversed order) must not matter: the encoding alone decides what is kept
        other = {index: -s for index, s in original.items()}
        assert select(keep_map_scores(keep, other)).keep == keep


@pytest.mark.parametrize("mode", ["global", "uniform"])
def test_refinement_takes_only_one_expert_moves_that_lower_the_fit_kl(mode):
    from diep_hub.criteria.refinement import refine_keep_map

    model = tiny_model("qwen3_moe")
    layers = get_family(model).moe_layers(model)
    ids = sample_input_ids(batch=6, length=12, seed=5)
    select = _selection(model, 0.5, mode)
    scores = {layer.index: torch.randn(layer.num_experts, generator=torch.Generator().manual_seed(7 + layer.index))
              for layer in layers}
    start = select(scores).keep
    refined, moves, history, *_ = refine_keep_map(model, layers, start, scores, select, ids, rounds=4, batch_size=3)

    assert history[0] == masked_kl(model, layers, [start], ids, batch_size=3)[0]
    assert len(history) == len(moves) + 1 and all(b < a for a, b in zip(history, history[1:]))
    assert history[-1] == pytest.approx(masked_kl(model, layers, [refined], ids, batch_size=3)[0], rel=1e-6)
    assert moves, "random scores leave room for a better map: a search that never moves tests nothing"
    current = {i: sorted(v) for i, v in start.items()}
    for move in moves:  # each move swaps one expert out and one in, as recorded
        (drop_layer, drops), (add_layer, adds) = move["drop"], move["add"]
        assert len(drops) == len(adds) == 1  # no grouped routing here: single experts
        assert drops[0] in current[drop_layer] and adds[0] not in current[add_layer]
        current[drop_layer].remove(drops[0])
        current[add_layer] = sorted(current[add_layer] + adds)
    assert current == {i: sorted(v) for i, v in refined.items()}
    assert sum(map(len, refined.values())) == sum(map(len, start.values()))
    if mode == "uniform":  # uniform counts are the selection's: only swaps within a layer rebuild
        assert {i: len(v) for i, v in refined.items()} == {i: len(v) for i, v in start.items()}
    assert select(scores_for(refined, scores)).keep == refined


class _LostUtility:
    """A stand-in for MaskedKL with a known answer: a keep map's loss on a sequence is the summed utility of the
    experts it removes (one utility per expert, or one row of them per sequence), the same in every layer. Records
    how many keep maps each measurement asked for."""

    def __init__(self, utility: list[float] | list[list[float]]):
        rows = utility if isinstance(utility[0], list) else [utility]
        self.utility = torch.tensor(rows, dtype=torch.float64)  # [sequences, experts]
        self.calls: list[int] = []

    def _per_sequence(self, keep) -> tuple[float, torch.Tensor]:
        removed = [e for ids in keep.values() for e in range(self.utility.shape[1]) if e not in ids]
        per_sequence = self.utility[:, removed].sum(dim=1)
        return float(per_sequence.mean()), per_sequence

    def _loss(self, keep) -> float:
        return self._per_sequence(keep)[0]

    def set_base(self, keep):
        return self._per_sequence(keep)

    def per_sequence(self, keep_maps, progress=False, offer_as_base=False):
        self.calls.append(len(keep_maps))
        return [self._per_sequence(keep) for keep in keep_maps]

    def means(self, keep_maps, progress=False, offer_as_base=False):
        return [mean for mean, _ in self.per_sequence(keep_maps)]

    def nominal_shares(self, keep_maps):
        return [1.0] * len(keep_maps)  # no layers to resume from: one pass a keep map


@pytest.mark.parametrize("width", [1, 2, 0])
def test_wider_probes_find_the_moves_the_scores_order_hides(width):
    from diep_hub.criteria.refinement import refine_keep_map

    model = tiny_model("mixtral")
    layers = get_family(model).moe_layers(model)
    scores = {layer.index: torch.arange(8, dtype=torch.float32) for layer in layers}
    select = _selection(model, 0.5)
    start = select(scores).keep
    assert all(sorted(ids) == [4, 5, 6, 7] for ids in start.values())
    # by the scores, expert 4 is the weakest kept and 3 the strongest removed: swapping them loses 5 - 3; expert 7
    # is worth nothing and expert 0 the most, which only probes past the first in the scores' order can see
    measure = _LostUtility([50.0, 1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 0.0])
    refined, moves, history, *_ = refine_keep_map(model, layers, start, scores, select, None, rounds=8,
                                                  batch_size=1, kl=measure, probe_width=width)

    # the first round's probes: each layer's `width` weakest kept and strongest removed experts (0: all 8)
    assert measure.calls[0] == len(layers) * 2 * (width or 4)
    if width == 1:
        assert moves == [] and refined == {i: sorted(v) for i, v in start.items()} and history == [measure._loss(start)]
        return
    # width 2 sees expert 5 kept and 2 removed: no better swap either; width 0 sees 7 and 0
    if width == 2:
        assert moves == []
        return
    assert all(sorted(ids) == [0, 4, 5, 6] for ids in refined.values()), refined
    assert history == [measure._loss(start) - 50.0 * k for k in range(len(layers) + 1)]
    assert select(scores_for(refined, scores)).keep == refined


@pytest.mark.parametrize(("max_passes", "widths", "moves_made", "stopped"), [
    (None, [4, 4, 4, 4, 4], 4, "no move lowers the KL"),
    (36.0, [4], 1, "budget of passes spent"),  # the start, 2 x 4 probes x 4 layers, 3 shortlisted: 36
    (20.0, [2], 0, "no move lowers the KL"),  # 2 x 2 x 4 probes + 3 fit in 19, 2 x 3 x 4 + 3 do not
    (4.0, [], 0, "budget of passes spent"),  # not even one probe each way a layer (8 + 3)
])
def test_a_budget_of_passes_narrows_the_probes_then_stops_the_search(max_passes, widths, moves_made, stopped):
    """The test above's model and utilities with every expert probed: a round that would not fit in max_passes
    measures fewer probes a layer, the widest that fits, and the search stops when not even one fits. The stand-in
    measure counts one pass a keep map (it has no layers to resume from), so the passes are exact."""
    from diep_hub.criteria.refinement import refine_keep_map

    model = tiny_model("mixtral")
    layers = get_family(model).moe_layers(model)
    assert len(layers) == 4
    scores = {layer.index: torch.arange(8, dtype=torch.float32) for layer in layers}
    select = _selection(model, 0.5)
    start = select(scores).keep
    measure = _LostUtility([50.0, 1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 0.0])
    result = refine_keep_map(model, layers, start, scores, select, None, rounds=8, batch_size=1, kl=measure,
                             probe_width=0, max_passes=max_passes)

    assert result.probe_widths == widths
    assert len(result.moves) == moves_made
    assert result.stopped == stopped
    assert result.passes == 1 + sum(measure.calls)  # the start's measurement, then one a keep map measured
    if max_passes is not None:
        assert result.passes <= max_passes
    if widths:
        assert measure.calls[0] == 2 * widths[0] * len(layers)
    if moves_made:  # each move is the best one: expert 7 (worth nothing) out, expert 0 (worth 50) in
        assert result.history == [measure._loss(start) - 50.0 * k for k in range(moves_made + 1)]


#: a refinement small enough for a tiny model: 8 calibration sequences, half held out, 4 refine sequences
SMALL_REFINEMENT = {"validation_fraction": 0.5, "refine_rounds": 3, "refine_sequences": 4, "min_gain_se": 0}


def _refining_run(model_type: str, options: dict):
    """A validated_choice prune at 50% of a fresh tiny model: (pruner, the unpruned model, the pruned one)."""
    base = tiny_model(model_type)
    pruner = fast_pruner(sparsity=0.5, method="validated_choice", options=options)
    return pruner, base, pruner.prune_model(copy.deepcopy(base), pruner_tokenizer())


def _by_held_out_kl(details: dict) -> list[str]:
    """The judged keep maps' labels, lowest held-out KL first (ties in the order judged, as validated_choice)."""
    judged = details["candidates"]
    return sorted(judged, key=lambda label: judged[label]["validation_kl"])


def test_the_pruner_reports_how_its_budget_of_passes_bounded_the_refinement():
    """refine_budget reaches the refinement in passes over the calibration set: 1 pass over 8 calibration sequences
    is 2 over the 4 refine ones, which holds the start's measurement and not one round; 0 leaves it unbounded."""
    reports, details = {}, {}
    for budget in (0.0, 1.0, 16.0):
        pruner, _, _ = _refining_run("mixtral", SMALL_REFINEMENT | {"refine_budget": budget})
        details[budget] = pruner.report.details
        (reports[budget],) = pruner.report.details["refinements"].values()
    assert details[0.0]["refine_budget_passes"] is None
    assert details[1.0]["refine_budget_passes"] == pytest.approx(2.0)
    assert details[16.0]["refine_budget_passes"] == pytest.approx(32.0)
    assert reports[1.0]["moves"] == [] and reports[1.0]["probe_widths"] == []
    assert reports[1.0]["stopped"] == "budget of passes spent" and reports[1.0]["passes"] == 1.0
    assert reports[0.0]["moves"] and set(reports[0.0]["probe_widths"]) == {4}
    assert reports[0.0]["passes"] > reports[16.0]["passes"]  # 16 binds on this small calibration set
    assert reports[16.0]["passes"] <= 32.0


def test_the_refinements_of_one_run_share_its_budget_of_passes():
    """With three keep maps refined, each refinement gets what the ones before left: 2 passes over the refine
    sequences hold the first two starts' measurements and nothing for the third, which measures nothing."""
    pruner, _, _ = _refining_run("mixtral", SMALL_REFINEMENT | {"refine_candidates": 3, "probe_width": 1,
                                                               "refine_budget": 1.0})
    reports = [pruner.report.details["refinements"][label] for label in _by_held_out_kl(pruner.report.details)]
    assert [r["passes"] for r in reports] == [1.0, 1.0, 0.0]
    assert [len(r["fit_kl"]) for r in reports] == [1, 1, 0]
    assert all(r["stopped"] == "budget of passes spent" and r["moves"] == [] for r in reports)


def scores_for(keep, scores):
    from diep_hub.criteria.refinement import keep_map_scores

    return keep_map_scores(keep, scores)


def test_the_pruner_applies_the_refined_keep_map_when_the_held_out_kl_confirms_it():
    tokenizer = pruner_tokenizer()
    pruner, base, model = _refining_run("mixtral", SMALL_REFINEMENT | {"candidates": ["random"]})

    refinement = pruner.report.details["refinement"]
    from diep_hub.calibration import load_calibration_data

    ids = load_calibration_data(pruner.dataset, tokenizer, num_samples=8, seq_len=16, seed=0)
    fit, held_out = split_calibration(ids, 0.5)
    layers = get_family(base).moe_layers(base)
    select = _selection(base, 0.5)
    context = scoring_context(base, fit, batch_size=4, sparsity=0.5)
    start = select(get_criterion("random")().score(context).scores).keep
    unrefined_kl = masked_kl(base, layers, [start], held_out, batch_size=4)[0]
    assert pruner.report.details["candidates"]["random"]["validation_kl"] == unrefined_kl
    assert refinement["moves"], "random scores leave room for a better map: a search that never moves tests nothing"
    applied = pruner.report.kept_original_ids
    assert refinement["accepted"] == (refinement["validation_kl"] < unrefined_kl)
    if refinement["accepted"]:
        assert applied != start and masked_kl(base, layers, [applied], held_out, batch_size=4)[0] == pytest.approx(
            refinement["validation_kl"], rel=1e-6)
        assert refinement["per_layer_kept"] == {str(k): len(v) for k, v in sorted(applied.items())}
    else:
        assert applied == start
    for k, ids_kept in applied.items():  # surgery kept exactly those experts' weights
        layer = get_family(model).moe_layers(model)[k].experts
        assert torch.equal(layer.down_proj, get_family(base).moe_layers(base)[k].experts.down_proj[ids_kept])


def test_every_refined_candidate_competes_on_the_held_out_kl():
    """With refine_candidates=3 each judged keep map is refined, and the pruner applies the lowest held-out KL among
    the validated winner and the refined maps the held-out tokens confirm (recomputed here from the report;
    min_gain_se=0: any lower KL counts; probe_width=1, where a refined runner-up wins on this model)."""
    tokenizer = pruner_tokenizer()
    pruner, base, model = _refining_run("qwen3_moe", SMALL_REFINEMENT | {
        "candidates": ["random", "frequency", "reap"], "refine_candidates": 3, "probe_width": 1})

    details = pruner.report.details
    assert set(details["refinements"]) == {"random", "frequency", "reap"}
    from diep_hub.calibration import load_calibration_data

    ids = load_calibration_data(pruner.dataset, tokenizer, num_samples=8, seq_len=16, seed=0)
    _, held_out = split_calibration(ids, 0.5)
    layers = get_family(base).moe_layers(base)
    judged = {label: c["validation_kl"] for label, c in details["candidates"].items()}
    winner = min(judged, key=judged.get)
    offers = {(winner, "validated"): judged[winner]}
    for label, report in details["refinements"].items():
        assert report["accepted"] == (report["validation_kl"] is not None and report["validation_kl"] < judged[label])
        if report["accepted"]:
            offers[(label, "refined")] = report["validation_kl"]
    (label, kind) = min(offers, key=offers.get)
    # this model and seed exercise the new path: a refined runner-up beats the validated winner
    assert kind == "refined" and label != winner, offers
    applied = pruner.report.kept_original_ids
    assert details["chosen"] == label
    assert masked_kl(base, layers, [applied], held_out, batch_size=4)[0] == pytest.approx(offers[(label, kind)],
                                                                                         rel=1e-6)
    assert details["refinement"] == details["refinements"][label]
    assert f"{label} (" in pruner.report.ranking and "refined by" in pruner.report.ranking
    for k, ids_kept in applied.items():  # surgery kept exactly those experts' weights
        layer = get_family(model).moe_layers(model)[k].experts
        assert torch.equal(layer.down_proj, get_family(base).moe_layers(base)[k].experts.down_proj[ids_kept])


def test_an_nll_refinement_climbs_and_is_judged_by_the_pruned_models_own_nll():
    """refine_objective="nll": the candidates are still judged by the held-out KL; the refinement's history is the
    NLL of the refine sequences, and the refined map replaces the winner only if its held-out NLL is lower (both
    recomputed here with MaskedKL's NLL, which tests/test_masked_kl.py checks against surgery)."""
    from diep_hub.calibration import load_calibration_data
    from diep_hub.criteria.masked_kl import MaskedKL

    pruner, base, model = _refining_run("mixtral", SMALL_REFINEMENT | {"candidates": ["random"],
                                                                      "refine_objective": "nll"})
    details = pruner.report.details
    refinement = details["refinement"]
    ids = load_calibration_data(pruner.dataset, pruner_tokenizer(), num_samples=8, seq_len=16, seed=0)
    fit, held_out = split_calibration(ids, 0.5)
    layers = get_family(base).moe_layers(base)
    start = _selection(base, 0.5)(get_criterion("random")().score(scoring_context(base, fit, batch_size=4,
                                                                                  sparsity=0.5)).scores).keep
    assert details["candidates"]["random"]["validation_kl"] == masked_kl(base, layers, [start], held_out,
                                                                         batch_size=4)[0]
    fit_nll = MaskedKL(base, layers, fit[:4], batch_size=4, objective="nll")
    held_out_nll = MaskedKL(base, layers, held_out, batch_size=4, objective="nll")
    assert refinement["objective"] == "nll" and refinement["moves"], "a search that never moves tests nothing"
    assert refinement["fit_kl"][0] == pytest.approx(fit_nll.means([start])[0], rel=1e-6)
    assert all(a > b for a, b in zip(refinement["fit_kl"], refinement["fit_kl"][1:]))  # each move lowered it
    start_nll = held_out_nll.means([start])[0]
    assert refinement["accepted"] == (refinement["validation_kl"] < start_nll)
    applied = pruner.report.kept_original_ids
    if refinement["accepted"]:
        assert applied != start
        assert held_out_nll.means([applied])[0] == pytest.approx(refinement["validation_kl"], rel=1e-6)
    else:
        assert applied == start
    for k, ids_kept in applied.items():  # surgery kept exactly those experts' weights
        layer = get_family(model).moe_layers(model)[k].experts
        assert torch.equal(layer.down_proj, get_family(base).moe_layers(base)[k].experts.down_proj[ids_kept])


def test_an_nll_refinement_measures_only_the_maps_it_refines_on_the_held_out_nll(monkeypatch):
    """With refine_objective="nll" and refine_candidates=2 of three judged maps, the held-out NLL is measured for the
    two maps refined (the winner first) and nothing else; the map applied is the lowest held-out NLL among the winner
    and the refined maps that beat it."""
    from diep_hub.calibration import load_calibration_data
    from diep_hub.criteria.masked_kl import MaskedKL

    measured: list[list[dict]] = []
    per_sequence = MaskedKL.per_sequence

    def spy(self, keep_maps, *args, **kwargs):
        if self.objective == "nll" and self.desc.endswith("judging refinements"):
            measured.append([dict(k) for k in keep_maps])
        return per_sequence(self, keep_maps, *args, **kwargs)

    monkeypatch.setattr(MaskedKL, "per_sequence", spy)
    pruner, base, _ = _refining_run("mixtral", SMALL_REFINEMENT | {
        "candidates": ["random", "frequency", "reap"], "refine_candidates": 2, "refine_objective": "nll"})
    details = pruner.report.details
    order = _by_held_out_kl(details)
    assert sorted(details["refinements"]) == sorted(order[:2])
    ids = load_calibration_data(pruner.dataset, pruner_tokenizer(), num_samples=8, seq_len=16, seed=0)
    fit, held_out = split_calibration(ids, 0.5)
    layers = get_family(base).moe_layers(base)
    context = scoring_context(base, fit, batch_size=4, sparsity=0.5)
    starts = {name: _selection(base, 0.5)(get_criterion(name)().score(context).scores).keep for name in order[:2]}
    # one pass over the held-out share with the two maps refined; then each refinement that moved, its own map
    assert measured[0] == [starts[order[0]], starts[order[1]]]
    moved = [r for r in details["refinements"].values() if r["moves"]]
    assert moved and len(measured) == 1 + len(moved) and all(len(maps) == 1 for maps in measured[1:])
    held_out_nll = MaskedKL(base, layers, held_out, batch_size=4, objective="nll")
    winner = held_out_nll.means([starts[order[0]]])[0]
    beaten = [r["validation_kl"] for r in details["refinements"].values() if r["accepted"] and
              r["validation_kl"] < winner]
    assert held_out_nll.means([pruner.report.kept_original_ids])[0] == pytest.approx(min([winner, *beaten]),
                                                                                     rel=1e-6)


def test_gain_in_standard_errors_is_the_paired_difference_over_its_standard_error():
    from diep_hub.criteria.refinement import gain_in_standard_errors

    validated = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    refined = torch.tensor([0.5, 1.5, 2.4, 3.6], dtype=torch.float64)
    # gains 0.5, 0.5, 0.6, 0.4: mean 0.5, sample standard deviation sqrt(0.02 / 3), standard error that / 2
    assert gain_in_standard_errors(validated, refined) == pytest.approx(0.5 / (math.sqrt(0.02 / 3) / 2), rel=1e-12)
    assert gain_in_standard_errors(refined, validated) == pytest.approx(-0.5 / (math.sqrt(0.02 / 3) / 2),
                                                                         rel=1e-12)
    assert gain_in_standard_errors(validated, validated - 0.25) == math.inf  # every sequence gains alike
    assert gain_in_standard_errors(validated, validated) == 0.0
    assert gain_in_standard_errors(validated[:1], refined[:1]) == 0.0  # one sequence: no spread to judge by


@pytest.mark.parametrize("min_gain_se", [0.0, 1e9])
def test_a_refined_map_must_beat_the_winner_by_min_gain_se(min_gain_se):
    """The run of test_every_refined_candidate_competes_on_the_held_out_kl, where a refined runner-up has the lowest
    held-out KL: with min_gain_se=0 it is applied; with an unreachable margin the validated winner is, unrefined."""
    pruner, base, _ = _refining_run("qwen3_moe", SMALL_REFINEMENT | {
        "candidates": ["random", "frequency", "reap"], "refine_candidates": 3, "min_gain_se": min_gain_se,
        "probe_width": 1})

    details = pruner.report.details
    judged = {label: c["validation_kl"] for label, c in details["candidates"].items()}
    winner = min(judged, key=judged.get)
    accepted = {label: r for label, r in details["refinements"].items() if r["accepted"]}
    assert accepted and all(r["gain_se"] is None or r["gain_se"] < 1e9 for r in accepted.values())
    layers = get_family(base).moe_layers(base)
    from diep_hub.calibration import load_calibration_data

    ids = load_calibration_data(pruner.dataset, pruner_tokenizer(), num_samples=8, seq_len=16, seed=0)
    _, held_out = split_calibration(ids, 0.5)
    applied_kl = masked_kl(base, layers, [pruner.report.kept_original_ids], held_out, batch_size=4)[0]
    assert sum(r["applied"] for r in details["refinements"].values()) == (1 if min_gain_se == 0.0 else 0)
    if min_gain_se == 0.0:
        assert details["chosen"] != winner and "refined by" in pruner.report.ranking
        assert details["refinement"]["applied"] and details["refinements"][details["chosen"]]["applied"]
        assert applied_kl == pytest.approx(min(r["validation_kl"] for r in accepted.values()), rel=1e-6)
    else:
        assert details["chosen"] == winner and "refined by" not in pruner.report.ranking
        assert applied_kl == pytest.approx(judged[winner], rel=1e-6)


def test_refinement_keeps_every_groups_pace_under_grouped_routing():
    """A group-limited layer loses experts from every group at the same pace. Refinement must find the moves the
    selection can rebuild: swaps inside a group (it once proposed cross-group swaps only) and, between layers, one
    expert of every group at once (one-expert moves between layers can never be rebuilt there, so without these
    the refinement could not move kept slots from one layer to another)."""
    from diep_hub.criteria.refinement import refine_keep_map

    model = tiny_model("deepseek_v3", n_group=2, topk_group=1)
    layers = get_family(model).moe_layers(model)
    ids = sample_input_ids(batch=6, length=12, seed=5)
    select = _selection(model, 0.25)  # kept counts in {4, 6, 8}: room to move units between layers
    size = {layer.index: layer.num_experts // 2 for layer in layers}  # contiguous groups of N / n_group
    kinds = set()
    for seed in range(6):
        scores = {layer.index: torch.randn(layer.num_experts, generator=torch.Generator().manual_seed(seed * 10 + i))
                  for i, layer in enumerate(layers)}
        start = select(scores).keep
        refined, moves, history, *_ = refine_keep_map(model, layers, start, scores, select, ids, rounds=3, batch_size=3)
        assert len(history) == len(moves) + 1 and all(b < a for a, b in zip(history, history[1:]))
        current = {i: sorted(v) for i, v in start.items()}
        for move in moves:
            (drop_layer, drops), (add_layer, adds) = move["drop"], move["add"]
            if len(drops) == 1:  # a swap inside one group of one layer
                assert drop_layer == add_layer and len(adds) == 1
                assert drops[0] // size[drop_layer] == adds[0] // size[add_layer]
                kinds.add("swap")
            else:  # a unit between two layers: one expert of each group leaves one layer and joins the other
                assert drop_layer != add_layer
                assert sorted(e // size[drop_layer] for e in drops) == [0, 1]
                assert sorted(e // size[add_layer] for e in adds) == [0, 1]
                kinds.add("unit")
            assert set(drops) <= set(current[drop_layer]) and not set(adds) & set(current[add_layer])
            current[drop_layer] = [e for e in current[drop_layer] if e not in drops]
            current[add_layer] = sorted(current[add_layer] + adds)
        assert current == {i: sorted(v) for i, v in refined.items()}
        assert history[-1] == pytest.approx(masked_kl(model, layers, [refined], ids, batch_size=3)[0], rel=1e-6)
        assert select(scores_for(refined, scores)).keep == refined
    assert kinds == {"swap", "unit"}, kinds


def test_global_runs_also_judge_each_candidates_uniform_keep_map():
    from diep_hub.criteria.refinement import keep_map_scores

    model = tiny_model("mixtral")
    ids = sample_input_ids(batch=8, length=12, seed=3)
    candidates = ["reap", "frequency", "random"]
    result, context = _choice(model, ids, candidates=candidates, validation_fraction=0.25, refine_rounds=0,
                              compare_uniform=True)
    fit, held_out = ids[:6], ids[6:]

    labels, keep_maps = [], []
    for name in candidates:
        own = get_criterion(name)().score(scoring_context(model, fit, batch_size=4, sparsity=0.5)).scores
        labels.append(name)
        keep_maps.append(select_experts(own, model, sparsity=0.5, mode="global").keep)
        uniform = select_experts(own, model, sparsity=0.5, mode="uniform").keep
        if uniform != keep_maps[-1]:
            labels.append(f"{name} (uniform)")
            keep_maps.append(uniform)
    assert any(label.endswith("(uniform)") for label in labels)  # the test can tell the two apart
    assert list(result.details["candidates"]) == labels
    kls = masked_kl(model, context.layers, keep_maps, held_out, batch_size=4)
    assert [result.details["candidates"][label]["validation_kl"] for label in labels] == kls
    best = min(range(len(kls)), key=lambda i: (kls[i], i))
    assert result.details["chosen"] == labels[best]
    # whatever won, the run's own (global) selection of the returned scores rebuilds exactly its keep map
    assert context.select(result.scores).keep == keep_maps[best]
    assert select_experts(keep_map_scores(keep_maps[1], result.scores), model, sparsity=0.5).keep == keep_maps[1]


def test_uniform_runs_judge_only_their_own_keep_maps():
    model = tiny_model("mixtral")
    ids = sample_input_ids(batch=8, length=12, seed=3)
    result, _ = _choice(model, ids, mode="uniform", candidates=["reap", "frequency"], refine_rounds=0,
                        compare_uniform=True)
    assert list(result.details["candidates"]) == ["reap", "frequency"]


def test_by_default_only_the_winners_keep_map_is_refined_with_four_probes_a_layer():
    """The defaults since benchmarks/CHOICE.md's ninth run: refine_candidates=1 refines only the validated winner's
    keep map, and probe_width=4 reaches the refinement: it makes the moves of refine_keep_map with width 4 on the
    winner's map and fit scores, which on this model are not width 1's (so a default that failed to arrive shows)."""
    from diep_hub.calibration import load_calibration_data
    from diep_hub.criteria.refinement import refine_keep_map

    tokenizer = pruner_tokenizer()
    pruner, base, _ = _refining_run("mixtral", SMALL_REFINEMENT)

    details = pruner.report.details
    winner = _by_held_out_kl(details)[0]
    assert set(details["refinements"]) == {winner}
    ids = load_calibration_data(pruner.dataset, tokenizer, num_samples=8, seq_len=16, seed=0)
    fit = split_calibration(ids, 0.5)[0]
    layers = get_family(base).moe_layers(base)
    select = _selection(base, 0.5)
    scores = get_criterion(winner)().score(scoring_context(base, fit, batch_size=4, sparsity=0.5)).scores
    keep = select(scores).keep
    # refine_budget=16 passes over the 8 calibration sequences: 32 over the 4 refine ones
    moves = {width: refine_keep_map(base, layers, keep, scores, select, fit[:4], 3, 4, probe_width=width,
                                    max_passes=32)[1]
             for width in (4, 1)}
    assert moves[4] != moves[1], moves
    assert details["refinements"][winner]["moves"] == moves[4]


@pytest.mark.parametrize("consistent", [False, True])
@pytest.mark.parametrize("floor", [0.0, 2.0])
def test_a_move_must_gain_more_than_min_move_gain_se(consistent, floor):
    """With min_move_gain_se a move is taken only if its gain is larger than that many standard errors of the
    per-sequence difference: a gain that some sequences see and others reverse (noise-sized) is refused, one every
    sequence sees is taken, and with 0 any lower mean is taken."""
    from diep_hub.criteria.refinement import refine_keep_map

    model = tiny_model("mixtral")
    layers = get_family(model).moe_layers(model)
    scores = {layer.index: torch.arange(8, dtype=torch.float32) for layer in layers}
    select = _selection(model, 0.5, "uniform")
    start = select(scores).keep
    # swapping the weakest kept expert (4) for the strongest removed one (3) changes a sequence's loss by
    # u[4] - u[3]: [-2, +2, -2, +1.9] (mean gain 0.025, about 0.025 standard errors) or [-2, -2, -2, -2.1]
    restored = [3.0, 3.0, 3.0, 3.1] if consistent else [3.0, -1.0, 3.0, -0.9]
    utility = [[0.0, 0.0, 0.0, gain, 1.0, 10.0, 10.0, 10.0] for gain in restored]
    measure = _LostUtility(utility)
    refined, moves, history, *_ = refine_keep_map(model, layers, start, scores, select, None, rounds=8,
                                                  batch_size=1, kl=measure, min_move_gain_se=floor)

    if consistent or floor == 0.0:
        assert len(moves) == len(layers)  # one swap a layer (uniform selection: within layers only)
        assert all(sorted(ids) == [3, 5, 6, 7] for ids in refined.values()), refined
        step = 2.025 if consistent else 0.025
        assert history == pytest.approx([measure._loss(start) - step * k for k in range(len(layers) + 1)])
    else:
        assert moves == [] and history == [measure._loss(start)]
        assert refined == {i: sorted(v) for i, v in start.items()}


def test_min_move_gain_se_reaches_the_refinement():
    """An unreachable floor stops every move of the pruner's refinement (the run of
    test_by_default_only_the_winners_keep_map_is_refined_with_four_probes_a_layer, which moves without it)."""
    moves = {}
    for floor in (0.0, 1e9):
        pruner, _, _ = _refining_run("mixtral", SMALL_REFINEMENT | {"min_move_gain_se": floor})
        (report,) = pruner.report.details["refinements"].values()
        moves[floor] = report["moves"]
    assert moves[0.0] and moves[1e9] == []
