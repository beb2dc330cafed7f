"""prune_experts: the definition of removing an expert, and every refused input.

Removing expert j means routing as if j's router logit were -inf (for DeepSeek-V3's sigmoid router: as if j could
never be selected). The property test checks that definition on random keep maps against the stock model with
the removed experts masked inside its own router. Masking and surgery compute that same maths in different ways
(an 8-row router product with -inf entries vs a product over the kept rows), so they agree within
tests/helpers/numerics.py's tolerance and on every greedy token; what surgery leaves untouched is compared bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode
from transformers import AutoConfig, AutoModelForCausalLM

import diep_hub
from diep_hub import KeepMapError, UnsupportedModelError
from diep_hub.families import get_family
from tests.helpers.numerics import assert_close_logits, assert_same_greedy, differs_beyond_tolerance
from tests.helpers.tiny_models import FAMILIES, sample_input_ids, tiny_model

# `a + b` reaches a TorchFunctionMode as TensorBase.add, not as Tensor.__add__.
ADDITIONS = (torch.Tensor.__add__, torch.Tensor.add, torch._C.TensorBase.add, torch.add)


class MaskRemovedExperts(TorchFunctionMode):
    """Inside the stock model's routers, push removed experts' logits (and selection scores) to -inf."""

    def __init__(self, masks: dict[int, torch.Tensor]):
        super().__init__()
        self.masks = masks  # id(router weight or selection bias) -> bool mask of removed experts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.linear and len(args) > 1 and id(args[1]) in self.masks:
            out = out.masked_fill(self.masks[id(args[1])], float("-inf"))
        elif func in ADDITIONS and len(args) > 1 and id(args[1]) in self.masks:
            out = out.masked_fill(self.masks[id(args[1])], float("-inf"))
        return out


def masked_reference_logits(model, keep, ids):
    masks = {}
    for layer in get_family(model).moe_layers(model):
        if layer.index not in keep:
            continue
        removed = torch.ones(layer.num_experts, dtype=torch.bool)
        removed[list(keep[layer.index])] = False
        masks[id(layer.router.weight)] = removed
        bias = getattr(layer.router, "e_score_correction_bias", None)
        if bias is not None:
            masks[id(bias)] = removed
    with torch.no_grad(), MaskRemovedExperts(masks):
        return model(ids).logits


# DeepSeek-V3 with one group: grouped selection then reduces to plain top-k, so masking defines removal.
PROPERTY_OVERRIDES = {"deepseek_v3": {"n_group": 1, "topk_group": 1}}


def _check_pruning_equals_masking(base, ids, keep_strategy) -> None:
    """For keep maps drawn from ``keep_strategy``: the pruned model's logits equal the stock model's with the
    removed experts masked in its routers."""

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(keep=keep_strategy)
    def check(keep):
        reference = masked_reference_logits(base, keep, ids)
        pruned = diep_hub.prune_experts(copy.deepcopy(base), keep)
        with torch.no_grad():
            logits = pruned(ids).logits
        assert_close_logits(logits, reference)
        assert_same_greedy(logits, reference)

    check()


@st.composite
def keep_maps(draw, moe_layers: list[int], num_experts: int, floor: int):
    chosen_layers = draw(st.lists(st.sampled_from(moe_layers), unique=True, min_size=1))
    keep = {}
    for index in chosen_layers:
        size = draw(st.integers(min_value=floor, max_value=num_experts))
        keep[index] = draw(st.permutations(range(num_experts)))[:size]
    return keep


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_equals_masking_removed_experts(family):
    base = tiny_model(family, **PROPERTY_OVERRIDES.get(family, {}))
    adapter = get_family(base)
    moe_layers = [layer.index for layer in adapter.moe_layers(base)]
    floor = adapter.layer_floor(base.config)
    ids = sample_input_ids()

    _check_pruning_equals_masking(base, ids, keep_maps(moe_layers, 8, floor))


@st.composite
def grouped_keep_maps(draw, moe_layers: list[int], num_experts: int, n_group: int):
    """Keep maps that grouped routing accepts: the same count (>= 2) from every group, listed group by group,
    in scrambled order within each group."""
    size = num_experts // n_group
    chosen_layers = draw(st.lists(st.sampled_from(moe_layers), unique=True, min_size=1))
    keep = {}
    for index in chosen_layers:
        per_group = draw(st.integers(min_value=2, max_value=size))
        keep[index] = [g * size + e for g in range(n_group) for e in draw(st.permutations(range(size)))[:per_group]]
    return keep


GROUPED_ROUTING = {
    "deepseek_v3": {"n_group": 2, "topk_group": 1},  # sigmoid + e_score_correction_bias, groups by top-2 sum
    "deepseek_v2": {"n_group": 2, "topk_group": 1, "topk_method": "group_limited_greedy"},  # groups by max
}


@pytest.mark.parametrize("family", sorted(GROUPED_ROUTING))
def test_grouped_routing_pruning_equals_masking_removed_experts(family):
    """With n_group=2 (and DeepSeek-V3's random e_score_correction_bias), pruning group by group equals masking."""
    base = tiny_model(family, **GROUPED_ROUTING[family])
    layers = get_family(base).moe_layers(base)
    assert all(layer.router.num_group == 2 for layer in layers)
    if family == "deepseek_v3":
        assert all(layer.router.e_score_correction_bias.abs().sum() > 0 for layer in layers)
    ids = sample_input_ids()

    _check_pruning_equals_masking(base, ids, grouped_keep_maps([layer.index for layer in layers], 8, 2))


def test_keep_maps_that_mix_groups_are_refused():
    model = tiny_model("deepseek_v3", n_group=2, topk_group=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # 4 experts, but 0, 1, 2 come from group 0 (experts 0-3) and only 5 from group 1 (4-7): surgery would route
    # expert 2 as a member of group 1.
    with pytest.raises(KeepMapError, match=r"layer 1: grouped routing \(n_group=2; groups 0: 0-3, 1: 4-7\)"):
        diep_hub.prune_experts(model, {1: [0, 1, 2, 5]})
    with pytest.raises(KeepMapError, match=r"positions 0-1 should hold 2 experts of group 0, but hold \[4\]"):
        diep_hub.prune_experts(model, {1: [0, 4, 1, 5]})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # regrouping is the explicit way out, and a regrouped layer still keeps two experts (group scoring is top-2)
    with pytest.raises(KeepMapError, match=r"layer 1 would keep 1 expert\(s\) but needs at least 2"):
        diep_hub.prune_experts(model, {1: [3]}, regroup=[1], allow_below_top_k=True)
    diep_hub.prune_experts(model, {1: [0, 1, 2, 5]}, regroup=[1])
    assert model.config.num_experts_per_layer[1] == 4


# ------------------------------------------------------------------------------------------------------------
# Refused inputs: each names the layer and value, and leaves the model untouched.

BAD_KEEP_MAPS = [
    ({0: [0, 1, 8]}, r"layer 0: expert ids \[8\] are out of range; this layer has ids 0\.\.7"),
    ({0: [0, -1, 2]}, r"layer 0: expert ids \[-1\] are out of range"),
    ({0: [0, 1, 1, 2]}, r"layer 0: expert ids \[1\] are listed more than once"),
    ({0: []}, r"layer 0 keeps no experts"),
    ({0: [3]}, r"layer 0 would keep 1 expert\(s\) but needs at least 2 \(top-k is 2\); keep between 2 and 8"),
    ({7: [0, 1]}, r"layer 7 is not a MoE layer of this mixtral model; MoE layers are \[0, 1, 2, 3\]"),
    ({0: [0, 1.5]}, r"layer 0: expert id 1.5 must be an integer"),
]


@pytest.mark.parametrize("keep, message", BAD_KEEP_MAPS)
def test_bad_keep_maps_raise_before_any_change(keep, message):
    model = tiny_model("mixtral")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    good_and_bad = {1: [0, 1, 2], **keep}  # a valid entry first: it must not be applied either
    with pytest.raises(KeepMapError, match=message):
        diep_hub.prune_experts(model, good_and_bad)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.model_type == "mixtral"
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


def test_phimoe_floor_is_two_even_below_top_k():
    model = tiny_model("phimoe", num_experts_per_tok=1)
    with pytest.raises(KeepMapError, match=r"needs at least 2 .*phimoe needs at least 2"):
        diep_hub.prune_experts(model, {0: [4]})
    diep_hub.prune_experts(model, {0: [4, 5]})
    assert model.config.num_experts_per_layer[0] == 2


def test_dense_layer_of_deepseek_is_refused():
    model = tiny_model("deepseek_v2")
    with pytest.raises(KeepMapError, match=r"layer 0 is not a MoE layer .* MoE layers are \[1, 2, 3\]"):
        diep_hub.prune_experts(model, {0: [0, 1]})


def test_below_top_k_only_when_asked_and_top_k_is_clamped():
    model = tiny_model("mixtral", num_experts_per_tok=3)
    with pytest.raises(KeepMapError, match=r"pass allow_below_top_k=True"):
        diep_hub.prune_experts(model, {0: [1, 2]})
    diep_hub.prune_experts(model, {0: [1, 2]}, allow_below_top_k=True)
    assert model.model.layers[0].mlp.gate.top_k == 2
    assert model.config.layer_top_k(0) == 2 and model.config.layer_top_k(1) == 3
    assert model(sample_input_ids()).logits.isfinite().all()


def test_grouped_routing_capacity_is_checked():
    model = tiny_model("deepseek_v3", num_experts_per_tok=4, topk_group=1)
    with pytest.raises(KeepMapError, match=r"1 selected group\(s\) of 2 experts cannot supply top-k=4"):
        diep_hub.prune_experts(model, {1: [0, 1, 4, 5]})


@pytest.mark.parametrize(
    "model_type, kwargs",
    [
        (
            "llama",
            dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4),
        ),
        ("gpt2", dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4)),
    ],
)
def test_dense_or_unknown_models_name_the_supported_families(model_type, kwargs):
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
    with pytest.raises(UnsupportedModelError, match=rf"model_type '{model_type}' is not a supported.*deepseek_v2, "):
        diep_hub.prune_experts(model, {0: [0]})


def test_empty_keep_map_converts_without_removing_anything():
    model = tiny_model("olmoe")
    ids = sample_input_ids()
    with torch.no_grad():
        before = model(ids).logits
    diep_hub.prune_experts(model, {})
    assert model.config.model_type == "diep_olmoe"
    assert model.config.num_experts_per_layer == [8, 8, 8, 8]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_supported_families_listing():
    assert diep_hub.supported_families() == sorted(FAMILIES)


def test_masking_reference_is_not_vacuous():
    model = tiny_model("mixtral")
    ids = sample_input_ids()
    with torch.no_grad():
        stock = model(ids).logits
    reference = masked_reference_logits(model, {0: [0, 1]}, ids)
    assert differs_beyond_tolerance(reference, stock)
    pruned = diep_hub.prune_experts(copy.deepcopy(model), {0: [0, 1]})
    with torch.no_grad():
        logits = pruned(ids).logits
    assert_close_logits(logits, reference)
    assert_same_greedy(logits, reference)


def test_selection_bias_masking_is_not_vacuous():
    """Masking only DeepSeek-V3's router logits is not enough: a removed expert with a large
    e_score_correction_bias would still be selected. The reference masks the bias addition as well."""
    model = tiny_model("deepseek_v3", n_group=1, topk_group=1)
    layer = get_family(model).moe_layers(model)[0]
    ids = sample_input_ids()
    removed = torch.ones(8, dtype=torch.bool)
    removed[[0, 1]] = False
    with torch.no_grad(), MaskRemovedExperts({id(layer.router.weight): removed}):
        logits_only = model(ids).logits
    reference = masked_reference_logits(model, {layer.index: [0, 1]}, ids)
    assert differs_beyond_tolerance(logits_only, reference)
    pruned = diep_hub.prune_experts(copy.deepcopy(model), {layer.index: [0, 1]})
    with torch.no_grad():
        logits = pruned(ids).logits
    assert_close_logits(logits, reference)
    assert_same_greedy(logits, reference)


def test_disk_offloaded_experts_are_refused_before_any_change():
    model = tiny_model("mixtral")
    experts = model.model.layers[2].mlp.experts
    experts.down_proj = torch.nn.Parameter(torch.empty(experts.down_proj.shape, device="meta"))
    router_before = model.model.layers[0].mlp.gate.weight.clone()
    with pytest.raises(KeepMapError, match=r"layer 2: tensors \['down_proj'\] are offloaded to disk"):
        diep_hub.prune_experts(model, {0: [0, 1], 2: [0, 1]})
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router_before)
