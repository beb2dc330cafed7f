"""Selection: exact counts, floors, caps, DeepSeek-V3 group rules and uniform mode, on random score tables."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diep_hub
from diep_hub.errors import ConfigError
from diep_hub.selection import (
    LayerLimits,
    Selection,
    _dp_removals,
    _global_removals,
    _greedy_removals,
    layer_limits,
    round_half_up,
    select_experts,
    uniform_keep_counts,
)
from diep_hub.surgery import plan_surgery
from tests.helpers.tiny_models import tiny_model

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _uneven_mixtral():
    model = tiny_model("mixtral")
    return diep_hub.prune_experts(model, {1: [0, 2, 3, 5, 6, 7], 2: [1, 2, 4, 6, 7]})


MODELS = {
    "mixtral": tiny_model("mixtral"),  # 4 MoE layers x 8 experts, top-2
    "deepseek_v3": tiny_model("deepseek_v3"),  # layer 0 dense; 3 MoE layers x 8, n_group=2 (kept in {4, 6, 8})
    "phimoe": tiny_model("phimoe"),  # family minimum 2
    "uneven": _uneven_mixtral(),  # already pruned: 8, 6, 5, 8 experts
}


def _layers(model):
    return diep_hub.get_family(model).moe_layers(model)


def score_tables(model):
    """Scores with many ties (small integers) or arbitrary floats, one tensor a MoE layer."""
    layers = _layers(model)
    value = st.one_of(st.integers(0, 4).map(float), st.floats(-10, 10, allow_nan=False, width=32))
    return st.tuples(*[st.lists(value, min_size=ly.num_experts, max_size=ly.num_experts) for ly in layers]).map(
        lambda rows: {ly.index: torch.tensor(r, dtype=torch.float32) for ly, r in zip(layers, rows)}
    )


def _groups(model, layer, regroup: bool) -> list[list[int]]:
    """The expert ids of each routing group of a layer (one group unless DeepSeek-V3 grouped routing is on)."""
    grouping = layer.family.grouped_routing
    n_group = 1 if regroup or grouping is None else int(getattr(layer.router, grouping.router_group_attr, 1) or 1)
    size = layer.num_experts // n_group
    return [list(range(g * size, (g + 1) * size)) for g in range(n_group)]


def _check_structure(selection: Selection, model, scores):
    layers = _layers(model)
    assert set(selection.keep) == {ly.index for ly in layers}
    for layer in layers:
        kept = selection.keep[layer.index]
        assert kept == sorted(set(kept)) and all(0 <= e < layer.num_experts for e in kept)
        assert selection.per_layer_kept[layer.index] == len(kept)
        groups = _groups(model, layer, selection.regroup)
        # Every routing group keeps the same number of experts ...
        assert len({len(set(group) & set(kept)) for group in groups}) == 1
        # ... and within a group the removed experts are never better than the kept ones.
        for group in groups:
            removed = [e for e in group if e not in kept]
            kept_here = [e for e in group if e in kept]
            if removed and kept_here:
                assert max(scores[layer.index][removed]) <= min(scores[layer.index][kept_here])
    assert selection.num_total == sum(ly.num_experts for ly in layers)
    assert selection.num_removed == selection.num_total - sum(selection.per_layer_kept.values())
    # Surgery accepts the keep map as it is (floors and group rules already satisfied).
    plan_surgery(model, selection.keep, regroup=selection.regroup)
    assert json.loads(json.dumps(selection.to_dict()))["keep"] == {str(i): v for i, v in selection.keep.items()}
    assert Selection.from_dict(selection.to_dict()) == selection


def _greedy_reference(model, scores, target, max_removal):
    """Sort every (score, layer, expert) ascending; drop while the layer may still lose experts."""
    entries = sorted((float(scores[ly.index][e]), ly.index, e) for ly in _layers(model) for e in range(ly.num_experts))
    removed = {ly.index: [] for ly in _layers(model)}
    for _, layer, expert in entries:
        if sum(map(len, removed.values())) == target:
            break
        if len(removed[layer]) < max_removal[layer]:
            removed[layer].append(expert)
    return removed


@pytest.mark.parametrize("name", ["mixtral", "phimoe", "uneven"])
@SETTINGS
@given(data=st.data(), sparsity=st.floats(0, 0.99), cap=st.one_of(st.none(), st.floats(0.1, 1.0)))
def test_global_exact_count_floors_caps_and_greedy_optimum(name, data, sparsity, cap):
    model = MODELS[name]
    scores = data.draw(score_tables(model))
    limits = {ly.index: layer_limits(ly, model.config, max_layer_sparsity=cap) for ly in _layers(model)}
    total = sum(ly.num_experts for ly in limits.values())
    target = round_half_up(sparsity * total)
    if target > sum(ly.max_removal for ly in limits.values()):
        with pytest.raises(ConfigError, match=rf"sparsity={sparsity}.*largest feasible sparsity is"):
            select_experts(scores, model, sparsity=sparsity, max_layer_sparsity=cap)
        return
    selection = select_experts(scores, model, sparsity=sparsity, max_layer_sparsity=cap)
    _check_structure(selection, model, scores)
    assert selection.num_removed == target
    family = diep_hub.get_family(model)
    for layer in _layers(model):
        kept = selection.per_layer_kept[layer.index]
        assert kept >= max(layer.top_k, family.min_experts)
        if cap is not None:
            assert layer.num_experts - kept <= int(cap * layer.num_experts + 1e-9)
    # Without group rules the result is exactly "rank everything, drop the K lowest the limits allow".
    reference = _greedy_reference(model, scores, target, {i: ly.max_removal for i, ly in limits.items()})
    for index, ids in reference.items():
        assert sorted(set(range(limits[index].num_experts)) - set(selection.keep[index])) == sorted(ids)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_greedy_removals_give_the_dynamic_programmes_answer(data):
    """The fast path of global selection (every layer accepts 0 .. its maximum removals) must return the removal
    counts the DP returns, ties included: small integer scores make many ties across and within layers."""
    sizes = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=6))
    limits = []
    for index, size in enumerate(sizes):
        most = data.draw(st.integers(0, size))
        limits.append(LayerLimits(index=index, num_experts=size, floor=size - most,
                                  allowed_removals=tuple(range(most + 1)), why="test"))
    value = st.one_of(st.integers(0, 3).map(float), st.floats(-5, 5, allow_nan=False, width=32))
    arrays = {lim.index: np.array(data.draw(st.lists(value, min_size=lim.num_experts, max_size=lim.num_experts)),
                                  dtype=np.float64) for lim in limits}
    target = data.draw(st.integers(0, sum(lim.max_removal for lim in limits)))
    assert _greedy_removals(arrays, limits, target) == _dp_removals(arrays, limits, target)
    assert _global_removals(arrays, limits, target) == _dp_removals(arrays, limits, target)


@SETTINGS
@given(data=st.data(), sparsity=st.floats(0, 0.99), floor=st.one_of(st.none(), st.integers(1, 8)))
def test_global_deepseek_v3_groups_and_optimality(data, sparsity, floor):
    model = MODELS["deepseek_v3"]
    scores = data.draw(score_tables(model))
    layers = _layers(model)
    total = sum(ly.num_experts for ly in layers)
    target = round_half_up(sparsity * total)
    # Brute force over every allowed per-layer kept count: multiples of n_group=2 with >= 2 a group, >= floor;
    # each of the two groups (experts 0-3 and 4-7) gives up its own lowest (8 - c) / 2 scores.
    allowed = [c for c in (4, 6, 8) if floor is None or c >= floor or c == 8]

    def group_cost(values, kept):
        drop = (8 - kept) // 2
        return sum(float(torch.sort(values[g : g + 4]).values[:drop].double().sum()) for g in (0, 4))

    best = None
    for counts in itertools.product(allowed, repeat=len(layers)):
        if sum(8 - c for c in counts) != target:
            continue
        cost = sum(group_cost(scores[ly.index], c) for ly, c in zip(layers, counts))
        best = cost if best is None else min(best, cost)
    if best is None:
        with pytest.raises(ConfigError, match="largest feasible sparsity"):
            select_experts(scores, model, sparsity=sparsity, min_experts_per_layer=floor)
        return
    selection = select_experts(scores, model, sparsity=sparsity, min_experts_per_layer=floor)
    _check_structure(selection, model, scores)
    assert selection.num_removed == target
    assert all(selection.per_layer_kept[ly.index] in allowed for ly in layers)
    removed_cost = sum(
        float(scores[ly.index][[e for e in range(8) if e not in selection.keep[ly.index]]].double().sum())
        for ly in layers
    )
    assert removed_cost == pytest.approx(best, abs=1e-6)


@SETTINGS
@given(data=st.data(), sparsity=st.floats(0, 0.9))
def test_deepseek_v3_regroup_lifts_the_group_rule(data, sparsity):
    model = MODELS["deepseek_v3"]
    scores = data.draw(score_tables(model))
    target = round_half_up(sparsity * 24)
    if target > 18:  # floor is top-k = 2 a layer once groups are gone
        return
    selection = select_experts(scores, model, sparsity=sparsity, regroup=True)
    assert selection.regroup is True and selection.num_removed == target
    assert all(kept >= 2 for kept in selection.per_layer_kept.values())
    _check_structure(selection, model, scores)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "uneven"])
@SETTINGS
@given(data=st.data(), sparsity=st.floats(0, 0.99))
def test_uniform_mode_removes_the_same_share_everywhere(name, data, sparsity):
    model = MODELS[name]
    scores = data.draw(score_tables(model))
    layers = _layers(model)
    limits = [layer_limits(ly, model.config) for ly in layers]
    per_layer = {ly.index: round_half_up(sparsity * ly.num_experts) for ly in layers}
    if any(per_layer[lim.index] not in lim.allowed_removals for lim in limits):
        with pytest.raises(ConfigError, match="largest feasible uniform sparsity"):
            select_experts(scores, model, sparsity=sparsity, mode="uniform")
        return
    selection = select_experts(scores, model, sparsity=sparsity, mode="uniform")
    _check_structure(selection, model, scores)
    for layer in layers:
        assert layer.num_experts - selection.per_layer_kept[layer.index] == per_layer[layer.index]
    if name != "uneven":  # equal expert counts: literally the same count in every layer
        assert len({layer.num_experts - selection.per_layer_kept[layer.index] for layer in layers}) == 1
    assert selection.mode == "uniform" and "uniform" in selection.rounding


def test_rounding_is_half_up_and_explained():
    model = MODELS["mixtral"]
    scores = {ly.index: torch.arange(8, dtype=torch.float32) for ly in _layers(model)}
    # 32 experts: 0.3 -> 9.6 -> 10; 0.15625 * 32 = 5.0; 0.171875 * 32 = 5.5 -> 6 (Python's round gives 6 too)
    # and 0.203125 * 32 = 6.5 -> 7 (Python's round would give 6).
    for sparsity, expected in ((0.3, 10), (0.15625, 5), (0.171875, 6), (0.203125, 7)):
        selection = select_experts(scores, model, sparsity=sparsity)
        assert selection.num_removed == expected
        assert f"= {expected} removed" in selection.rounding and "round_half_up" in selection.rounding


def test_ties_break_by_layer_then_expert_id():
    model = MODELS["mixtral"]
    scores = {ly.index: torch.zeros(8) for ly in _layers(model)}
    selection = select_experts(scores, model, sparsity=0.25)  # 8 removed, all scores equal
    # Layer 0 loses all it may (6, down to the top-k floor), then layer 1 its lowest ids.
    assert selection.keep[0] == [6, 7] and selection.keep[1] == [2, 3, 4, 5, 6, 7]
    assert selection.keep[2] == selection.keep[3] == list(range(8))
    assert select_experts(scores, model, sparsity=0.25).keep == selection.keep


def test_global_is_non_uniform_when_a_layer_is_unimportant():
    model = MODELS["mixtral"]
    scores = {ly.index: torch.rand(8, generator=torch.Generator().manual_seed(ly.index)) + 1 for ly in _layers(model)}
    scores[2] = scores[2] * 0.01
    selection = select_experts(scores, model, sparsity=0.25)
    assert selection.per_layer_kept[2] == 2  # drops to the top-k floor
    assert selection.per_layer_kept[0] + selection.per_layer_kept[1] + selection.per_layer_kept[3] == 22


def test_floors_match_family_layer_floor_on_stock_models():
    for name in ("mixtral", "deepseek_v3", "phimoe"):
        model = MODELS[name]
        family = diep_hub.get_family(model)
        for layer in _layers(model):
            assert layer_limits(layer, model.config).floor == family.layer_floor(model.config)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, r"sparsity=1.0 must be a number in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity=-0.1 must be a number in \[0, 1\)"),
        ({"sparsity": float("nan")}, r"sparsity=nan"),
        ({"sparsity": True}, r"sparsity=True"),
        ({"sparsity": "0.5"}, r"sparsity='0.5'"),
        ({"sparsity": 0.5, "mode": "layerwise"}, r"mode='layerwise'.*\['global', 'uniform'\]"),
        ({"sparsity": 0.5, "max_layer_sparsity": 1.5}, r"max_layer_sparsity=1.5 must be a number in \[0, 1\]"),
        ({"sparsity": 0.5, "min_experts_per_layer": 0}, r"min_experts_per_layer=0 must be an integer >= 1"),
        ({"sparsity": 0.5, "regroup": "yes"}, r"regroup='yes'"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    model = MODELS["mixtral"]
    scores = {ly.index: torch.rand(8) for ly in _layers(model)}
    with pytest.raises(ConfigError, match=match):
        select_experts(scores, model, **kwargs)


def test_scores_that_do_not_match_the_model_are_refused():
    model = MODELS["mixtral"]
    good = {ly.index: torch.rand(8) for ly in _layers(model)}
    with pytest.raises(ConfigError, match=r"missing \[3\]"):
        select_experts({i: s for i, s in good.items() if i != 3}, model, sparsity=0.5)
    with pytest.raises(ConfigError, match=r"not MoE layers \[7\]"):
        select_experts({**good, 7: torch.rand(8)}, model, sparsity=0.5)
    with pytest.raises(ConfigError, match=r"scores\[1\] has shape \(6,\), expected \(8,\)"):
        select_experts({**good, 1: torch.rand(6)}, model, sparsity=0.5)
    with pytest.raises(ConfigError, match=r"scores\[2\] has non-finite values at experts \[4\]"):
        bad = good[2].clone()
        bad[4] = float("inf")
        select_experts({**good, 2: bad}, model, sparsity=0.5)
    dense_layer = MODELS["deepseek_v3"]
    with pytest.raises(ConfigError, match=r"not MoE layers \[0\]"):
        select_experts(
            {0: torch.rand(8), **{ly.index: torch.rand(8) for ly in _layers(dense_layer)}}, dense_layer, sparsity=0.5
        )


def test_infeasible_sparsity_names_requested_and_largest_feasible():
    model = MODELS["deepseek_v3"]
    scores = {ly.index: torch.rand(8) for ly in _layers(model)}
    # Each layer removes 0, 2 or 4: 0.3 x 24 = 7.2 -> 7 is odd, impossible; the largest feasible is 12/24.
    with pytest.raises(ConfigError, match=r"sparsity=0.3 asks to remove 7 of 24.*largest feasible sparsity is 0.5000"):
        select_experts(scores, model, sparsity=0.3)
    with pytest.raises(ConfigError, match=r"nearest feasible counts: 6 \(0.2500\) and 8 \(0.3333\)"):
        select_experts(scores, model, sparsity=0.3)
    mixtral = MODELS["mixtral"]
    with pytest.raises(ConfigError, match=r"sparsity=0.9 .*largest feasible sparsity is 0.7500"):
        select_experts({ly.index: torch.rand(8) for ly in _layers(mixtral)}, mixtral, sparsity=0.9)
    with pytest.raises(ConfigError, match=r"largest feasible sparsity is 0.2500"):
        select_experts(
            {ly.index: torch.rand(8) for ly in _layers(mixtral)}, mixtral, sparsity=0.5, max_layer_sparsity=0.25
        )


def test_zero_sparsity_keeps_everything():
    model = MODELS["uneven"]
    scores = {ly.index: torch.rand(ly.num_experts) for ly in _layers(model)}
    selection = select_experts(scores, model, sparsity=0.0)
    assert selection.num_removed == 0
    assert selection.keep == {ly.index: list(range(ly.num_experts)) for ly in _layers(model)}


def test_uniform_keep_counts_are_known_before_scoring():
    assert uniform_keep_counts(MODELS["mixtral"], sparsity=0.25) == {0: 6, 1: 6, 2: 6, 3: 6}
    assert uniform_keep_counts(MODELS["uneven"], sparsity=0.5) == {0: 4, 1: 3, 2: 2, 3: 4}
    assert uniform_keep_counts(MODELS["deepseek_v3"], sparsity=0.5) == {1: 4, 2: 4, 3: 4}
    with pytest.raises(ConfigError, match=r"layer 1.*largest feasible uniform sparsity is 0.5000"):
        uniform_keep_counts(MODELS["deepseek_v3"], sparsity=0.375)
