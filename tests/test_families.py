"""Family adapters: each describes its model correctly, from the live model and from the config alone."""

from __future__ import annotations

import pytest
from tiny_models import FAMILIES, tiny_config, tiny_model

from diep_hub.families import base_model_type, get_family

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
