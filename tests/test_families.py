"""Family adapters: each describes its model correctly, from the live model and from the config alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from diep_hub.criteria.soft_frequency import router_probabilities
from diep_hub.errors import KeepMapError
from diep_hub.families import base_model_type, get_family
from diep_hub.selection import layer_limits
from diep_hub.surgery import plan_surgery
from tests.helpers.tiny_models import FAMILIES, tiny_config, tiny_model

EXPECTED_DENSE_LAYERS = {"deepseek_v2": [0], "deepseek_v3": [0]}
EXPECTED_FLOORS = {"phimoe": 2, "deepseek_v3": 4}  # top-2; phimoe minimum 2; 2 groups x 2 experts


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_every_moe_layer(family):
    model = tiny_model(family)
    adapter = get_family(model)
    layers = adapter.moe_layers(model)
    expected = [i for i in range(4) if i not in EXPECTED_DENSE_LAYERS.get(family, [])]
    assert [layer.index for layer in layers] == expected
    assert adapter.moe_layer_indices_from_config(model.config) == expected
    for layer in layers:
        assert layer.num_experts == adapter.num_experts(model.config) == 8
        assert layer.top_k == adapter.top_k(model.config) == 2
        for name in adapter.expert_tensors:
            assert getattr(layer.experts, name).shape[0] == 8
        for name in adapter.router_expert_tensors:
            assert getattr(layer.router, name).shape[0] == 8
        for attr in adapter.shared_expert_attrs:
            assert getattr(layer.block, attr) is not None
    assert adapter.layer_floor(model.config) == EXPECTED_FLOORS.get(family, 2)
    assert adapter.notes


def test_lookup_by_type_config_and_pruned_type():
    assert get_family("diep_qwen2_moe") is get_family("qwen2_moe") is get_family(tiny_config("qwen2_moe"))
    assert base_model_type("diep_gpt_oss") == "gpt_oss"


@pytest.mark.parametrize(
    "family, flag, expected",
    [("mixtral", None, True), ("qwen2_moe", False, False), ("qwen2_moe", True, True), ("deepseek_v2", None, False)],
)
def test_renormalisation_is_reported(family, flag, expected):
    overrides = {} if flag is None else {"norm_topk_prob": flag}
    config = tiny_config(family, **overrides)
    assert get_family(config).renormalizes(config) is expected


def test_qwen2_moe_mlp_only_layers_are_dense():
    model = tiny_model("qwen2_moe", mlp_only_layers=[1, 3])
    assert [layer.index for layer in get_family(model).moe_layers(model)] == [0, 2]
    assert get_family(model).moe_layer_indices_from_config(model.config) == [0, 2]


# ----------------------------------------------------------------------------------------------------------------
# Routing rules: each family's adapter states them (groups, activation, top-k field, floor), and they must be what
# the tiny model's config and routers actually do. Expected values are written out by hand, not computed.
V2_GROUPED = {"n_group": 2, "topk_group": 1, "topk_method": "group_limited_greedy"}

# (id, family, config overrides, family has grouped routing, active (n_group, topk_group) or None, activation, floor)
ROUTING_CASES = [
    ("deepseek_v2", "deepseek_v2", {}, True, None, "softmax", 2),  # greedy: groups unused
    ("deepseek_v2-grouped", "deepseek_v2", V2_GROUPED, True, (2, 1), "softmax", 4),  # 1 group of 2 supplies top-2
    ("deepseek_v2-greedy-n_group", "deepseek_v2", {"n_group": 2, "topk_group": 1}, True, None, "softmax", 2),
    ("deepseek_v3", "deepseek_v3", {}, True, (2, 1), "sigmoid", 4),  # 2 groups x 2 (group score = top-2 sum)
    ("deepseek_v3-4groups", "deepseek_v3", {"n_group": 4, "topk_group": 2}, True, (4, 2), "sigmoid", 8),
    ("deepseek_v3-top3", "deepseek_v3", {"num_experts_per_tok": 3}, True, (2, 1), "sigmoid", 6),  # 1 group gives 3
    ("deepseek_v3-ungrouped-top1", "deepseek_v3", {"n_group": 1, "num_experts_per_tok": 1}, True, None, "sigmoid", 2),
    ("gpt_oss", "gpt_oss", {}, False, None, "softmax", 2),
    ("granitemoe", "granitemoe", {}, False, None, "softmax", 2),
    ("mixtral", "mixtral", {}, False, None, "softmax", 2),
    ("mixtral-top1", "mixtral", {"num_experts_per_tok": 1}, False, None, "softmax", 1),
    ("olmoe", "olmoe", {}, False, None, "softmax", 2),
    ("phimoe", "phimoe", {}, False, None, "softmax", 2),
    ("phimoe-top1", "phimoe", {"num_experts_per_tok": 1}, False, None, "softmax", 2),  # sparsemixer needs 2
    ("qwen2_moe", "qwen2_moe", {}, False, None, "softmax", 2),
    ("qwen3_moe", "qwen3_moe", {}, False, None, "softmax", 2),
]


def test_routing_table_covers_every_family():
    assert {row[1] for row in ROUTING_CASES} == set(FAMILIES)


def _chosen_weights_from_probabilities(family: str, probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The top-k weights a router gives, from its full probabilities p, up to a per-token factor.

    Most routers weight the chosen experts in proportion to p (softmax over all or over the k, renormalised or not,
    scaled or not). PhiMoE's sparsemixer, with a jitter wide enough to keep every expert in play, gives the first
    choice p_1 and the second a softmax over the others, p_2 / (1 - p_1).
    """
    chosen = probs.gather(-1, index)
    if family == "phimoe":
        return torch.stack([chosen[:, 0], chosen[:, 1] / (1 - chosen[:, 0])], dim=-1)
    return chosen


@pytest.mark.parametrize(
    "family, overrides, grouped_family, groups, activation, floor",
    [pytest.param(*row[1:], id=row[0]) for row in ROUTING_CASES],
)
def test_routing_rules_match_the_tiny_model(family, overrides, grouped_family, groups, activation, floor):
    if family == "phimoe":
        overrides = {**overrides, "router_jitter_noise": 1e6}  # the sparsemixer mask then keeps every expert
    model = tiny_model(family, **overrides)
    config = model.config
    adapter = get_family(model)
    layers = adapter.moe_layers(model)
    n_group, topk_group = groups or (1, 1)

    # top-k field: the config field the adapter names is the one every router reads
    assert getattr(config, adapter.top_k_field) == adapter.top_k(config) == overrides.get("num_experts_per_tok", 2)
    assert {layer.top_k for layer in layers} == {adapter.top_k(config)}

    # groups: the router holds the config's counts; only active grouped routing constrains what a layer keeps
    assert adapter.has_grouped_routing is grouped_family
    config_rules = adapter.config_routing_rules(config)
    assert (config_rules.n_group, config_rules.topk_group) == (n_group, topk_group)
    for layer in layers:
        if grouped_family:
            assert adapter.routing_groups(layer) == (config.n_group, config.topk_group)
        else:
            assert adapter.routing_groups(layer) is None
        rules = adapter.routing_rules(layer, config)
        assert rules == config_rules
        assert (rules.n_group, rules.topk_group, rules.grouped) == (n_group, topk_group, groups is not None)
        regrouped = adapter.routing_rules(layer, config, regroup=True)
        assert (regrouped.n_group, regrouped.topk_group) == (1, 1)
        assert regrouped.floor() == max(rules.top_k, adapter.min_experts)

    # activation: the chosen experts' weights follow the declared activation's probabilities, and not the other's
    assert adapter.router_activation == activation
    other = {"softmax": "sigmoid", "sigmoid": "softmax"}[activation]
    layer = layers[0]
    hidden = torch.randn(16, config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, weights, index = type(layer.router).forward(layer.router, hidden)[:3]

    def mismatch(name: str) -> float:
        expected = _chosen_weights_from_probabilities(family, router_probabilities(logits, name), index)
        ratio = weights.float() / expected
        return float((ratio / ratio[:, :1] - 1).abs().max())

    if index.shape[1] > 1:  # with one expert a token every activation fits up to the factor
        assert mismatch(activation) < 1e-4
        assert mismatch(other) > 1e-2

    # floor: the adapter's, selection's and surgery's agree, and equal the hand-written value
    assert adapter.layer_floor(config) == floor
    size = 8 // n_group
    for layer in layers:
        assert adapter.min_experts_for(layer, config) == floor
        assert layer_limits(layer, config).floor == floor
        assert max(layer_limits(layer, config).allowed_removals) == 8 - floor
        keep = [g * size + e for g in range(n_group) for e in range(floor // n_group)]
        plan_surgery(model, {layer.index: keep})  # accepted
        if floor > 1:
            with pytest.raises(KeepMapError, match=rf"layer {layer.index}"):
                plan_surgery(model, {layer.index: list(range(floor - 1))})


@pytest.mark.parametrize("family", FAMILIES)
def test_config_setters_write_the_fields_the_model_reads(family):
    """``set_top_k`` / ``set_config_groups`` (used to write a stock config back) reach the routers built from it."""
    overrides = {"n_group": 2, "topk_group": 2} if family == "deepseek_v3" else {}
    config = tiny_config(family, **overrides)
    adapter = get_family(config)
    adapter.set_top_k(config, 1)
    adapter.set_config_groups(config, 1, 1)
    model = AutoModelForCausalLM.from_config(config)
    for layer in adapter.moe_layers(model):
        assert layer.top_k == 1
        if adapter.has_grouped_routing:
            assert adapter.routing_groups(layer) == (1, 1)
        else:
            assert adapter.routing_groups(layer) is None


def test_bad_router_activation_is_refused():
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"router_activation='relu'; expected one of \['softmax', 'sigmoid'\]"):
        replace(get_family("mixtral"), router_activation="relu")
    with pytest.raises(ValueError, match=r"router activation 'relu' is not one of"):
        router_probabilities(torch.zeros(2, 4), "relu")
