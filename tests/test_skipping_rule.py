"""Adaptive expert skipping, the rule on live models: off is bit-identical, gamma 0 skips nothing, a huge gamma is
top-1 routing, and every skip decision is the rule applied by hand, token by token, over every family.

Exactness: skip decisions made from the same numbers in the same process are compared bit for bit (mask against
the rule applied by hand, nothing-skipped pass-through, skipping off).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diep_hub.families import get_family
from diep_hub.skipping import (
    LayerSkipping,
    SkippingCalibration,
    calibrate_skipping,
    disable_skipping,
    enable_skipping,
    reset_skip_counters,
    skip_rates,
)
from tests.helpers.numerics import assert_close_logits, assert_same_greedy
from tests.helpers.skipping_models import IDS, forced_calibration, logits, pruned, routing_recorder
from tests.helpers.tiny_models import FAMILIES, tiny_model

# ---------------------------------------------------------------------------------------------------------------
# The rule on live models


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_off_is_bit_identical(family):
    reference = pruned(family)
    expected = logits(reference)
    model = pruned(family)
    enable_skipping(model, calibrate_skipping(model, IDS, max_tokens_for_cka=16), enabled=False)
    assert model.config.diep_skipping["enabled"] is False
    assert torch.equal(logits(model), expected)
    enable_skipping(model, calibrate_skipping(model, IDS, max_tokens_for_cka=16))
    assert not torch.equal(logits(model), expected)
    disable_skipping(model)
    assert skip_rates(model) == {}
    assert torch.equal(logits(model), expected)
    for layer in get_family(model).moe_layers(model):
        assert not layer.experts._forward_pre_hooks and not layer.experts._forward_hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_gamma_zero_skips_nothing(family):
    model = pruned(family)
    expected = logits(model)
    enable_skipping(model, forced_calibration(model, 0.0))
    assert torch.equal(logits(model), expected)
    rates = skip_rates(model)
    assert set(rates) == {layer.index for layer in get_family(model).moe_layers(model)}
    assert all(rate == 0.0 for rate in rates.values())


def top1_reference(model):
    """Independent top-1 routing: each token keeps only its highest-weight expert, weighted by the top-k sum."""

    def hook(module, args):
        hidden, index, weights = args
        primary = weights.argmax(dim=-1, keepdim=True)
        return hidden, index.gather(-1, primary), weights.sum(dim=-1, keepdim=True)

    return [layer.experts.register_forward_pre_hook(hook) for layer in get_family(model).moe_layers(model)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["grouped_mm", "eager"])
def test_gamma_huge_equals_top1_routing(family, backend):
    reference = pruned(family)
    reference.config._experts_implementation = backend
    handles = top1_reference(reference)
    expected = logits(reference)
    for handle in handles:
        handle.remove()
    model = pruned(family)
    model.config._experts_implementation = backend
    enable_skipping(model, forced_calibration(model, 1e30))
    got = logits(model)
    assert_close_logits(got, expected)
    assert_same_greedy(got, expected)
    assert all(rate == 1.0 for rate in skip_rates(model).values())
    reset_skip_counters(model)
    assert all(rate == 0.0 for rate in skip_rates(model).values())


def test_gamma_huge_equals_mixtral_with_router_top1():
    """Mixtral renormalises, so skipping every second expert is exactly the same model with top_k = 1."""
    reference = tiny_model("mixtral")
    for layer in get_family(reference).moe_layers(reference):
        layer.router.top_k = 1
    expected = logits(reference)
    model = tiny_model("mixtral")
    enable_skipping(model, forced_calibration(model, 1e30))
    assert model.config.model_type == "diep_mixtral"  # the stock model was converted in place
    got = logits(model)
    assert_close_logits(got, expected)
    assert_same_greedy(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_decision_matches_the_rule_token_by_token(family):
    """The skip mask equals the rule applied by hand to the router's own (unsorted) output, slot by slot."""
    model = pruned(family)
    calibration = calibrate_skipping(model, IDS, max_tokens_for_cka=24)
    enable_skipping(model, calibration)
    skippers = {layer.index: layer.experts.diep_skipping for layer in get_family(model).moe_layers(model)}
    for skipper in skippers.values():
        skipper.record = []
    before, handles = routing_recorder(model, after_skipping=False)
    logits(model)
    for handle in handles:
        handle.remove()
    decided = 0
    for index, skipper in skippers.items():
        table = calibration.to_config()["layers"][str(index)]
        ids, weights = before[index][0]
        mask = skipper.record[0]
        skipped = 0
        for t in range(ids.shape[0]):
            w = [float(v) for v in weights[t].float()]
            e = [int(v) for v in ids[t]]
            p = w.index(max(w))
            expected_skip = []
            for j in range(len(w)):
                gamma = np.float32(np.float32(table["cka_ratio"][e[p]][e[j]]) * np.float32(table["gamma1"]))
                expected_skip.append(j != p and np.float32(w[j]) < gamma * np.float32(w[p]))
            assert mask[t].tolist() == expected_skip, (index, t, w, e)
            skipped += sum(expected_skip)
        assert skip_rates(model)[index] == pytest.approx(skipped / (ids.shape[0] * (ids.shape[1] - 1)))
        decided += skipped
    assert decided > 0


def test_hand_set_router_weights_give_the_expected_skips():
    """One token a case: router logits set by hand so that each case's weights and verdict are known."""
    model = tiny_model("mixtral", num_hidden_layers=1)
    layer = get_family(model).moe_layers(model)[0]
    hidden = model.config.hidden_size
    # Experts 0..3 each read one basis direction; the hidden state fed to the router is taken from a hook.
    weight = torch.zeros(8, hidden)
    for e in range(4):
        weight[e, e] = 1.0
    with torch.no_grad():
        layer.router.weight.copy_(weight)
    ratio = torch.full((8, 8), 1.0)
    ratio[0, 1] = ratio[1, 0] = 1.5  # a similar pair: easier to skip
    ratio[0, 2] = ratio[2, 0] = 0.2  # a dissimilar pair: hard to skip
    ratio.fill_diagonal_(1.0)
    enable_skipping(
        model,
        SkippingCalibration("linear", {0: LayerSkipping(0.5, ratio, ratio, 0, 0.0)}, num_tokens=0, cka_tokens=0),
    )
    skipper = layer.experts.diep_skipping
    # (logit for experts 0, 1, 2, 3): weights after Mixtral's top-2 renormalisation are softmax over the pair
    cases = {
        "e1 far below e0, similar pair -> skip": ([3.0, 1.0, 0, 0], True),  # w1/w0 = e^-2 = 0.135 < 0.75
        "close weights, similar pair -> skip": ([1.0, 0.7, 0, 0], True),  # 0.741 < 0.75
        "close weights, similar pair -> keep": ([1.0, 0.75, 0, 0], False),  # 0.779 >= 0.75
        "dissimilar pair -> keep": ([3.0, -9, 1.0, 0], False),  # e^-2 = 0.135 >= 0.5 * 0.2 = 0.1
        "dissimilar pair -> skip": ([3.0, -9, 0.5, 0], True),  # e^-2.5 = 0.082 < 0.1
        "default pair ratio -> keep": ([-9, -9, 1.0, 0.5], False),  # e^-0.5 = 0.607 >= 0.5
    }
    hidden_states = torch.zeros(len(cases), hidden)
    for row, (values, _) in enumerate(cases.values()):
        hidden_states[row, :4] = torch.tensor(values)
    _, top_k_weights, top_k_index = layer.router(hidden_states)
    mask = skipper.decide(top_k_index, top_k_weights)
    for row, (name, (_, expected)) in enumerate(cases.items()):
        assert bool(mask[row].any()) is expected, name
        assert not mask[row, top_k_weights[row].argmax()], name  # the primary is never skipped
    # weights: a skipped row gives its primary the full sum; a kept row is untouched
    new_weights = skipper.reweight(top_k_weights, mask)
    for row, (name, (_, expected)) in enumerate(cases.items()):
        if expected:
            primary = int(top_k_weights[row].argmax())
            assert new_weights[row, primary] == top_k_weights[row].sum(), name
            assert new_weights[row, 1 - primary] == 0, name
        else:
            assert torch.equal(new_weights[row], top_k_weights[row]), name
    # and the experts are handed only the kept slots, one per row
    rows_hidden, rows_index, rows_weights = skipper.before(layer.experts, (hidden_states, top_k_index, top_k_weights))
    kept = ~mask
    assert torch.equal(rows_index.squeeze(-1), top_k_index[kept])
    assert torch.equal(rows_weights.squeeze(-1), new_weights[kept])
    assert torch.equal(rows_hidden, hidden_states.repeat_interleave(2, dim=0)[kept.reshape(-1)])


def test_top3_rule_tests_each_secondary_against_the_primary_and_keeps_the_sum():
    model = tiny_model("mixtral", num_experts_per_tok=3, num_hidden_layers=1)
    layer = get_family(model).moe_layers(model)[0]
    enable_skipping(model, forced_calibration(model, 0.5))
    skipper = layer.experts.diep_skipping
    index = torch.tensor([[4, 1, 6], [2, 7, 0], [3, 5, 1]])
    weights = torch.tensor([[0.2, 0.5, 0.3], [0.45, 0.35, 0.2], [0.6, 0.25, 0.15]])
    mask = skipper.decide(index, weights)
    # row 0: primary 1 (0.5); 0.2 < 0.25 skip, 0.3 keep. row 1: 0.35 keep, 0.2 skip. row 2: both < 0.3 skip.
    assert mask.tolist() == [[True, False, False], [False, False, True], [False, True, True]]
    new_weights = skipper.reweight(weights, mask)
    torch.testing.assert_close(new_weights.sum(-1), weights.sum(-1))
    torch.testing.assert_close(new_weights[0], torch.tensor([0.0, 0.5 / 0.8, 0.3 / 0.8]))
    assert new_weights[2].tolist() == [1.0, 0.0, 0.0]
    _, rows_index, rows_weights = skipper.before(layer.experts, (torch.zeros(3, 32), index, weights))
    assert rows_index.squeeze(-1).tolist() == [1, 6, 2, 7, 3]
    torch.testing.assert_close(rows_weights.squeeze(-1), new_weights[~mask])


@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_slots_never_reach_the_experts(family):
    """On every backend the experts compute only the kept slots: compute saved, no zero-weight fallback."""
    for backend in ("grouped_mm", "eager", "batched_mm"):
        model = pruned(family)
        model.config._experts_implementation = backend
        enable_skipping(model, calibrate_skipping(model, IDS, max_tokens_for_cka=16))
        after, handles = routing_recorder(model, after_skipping=True)
        logits(model)
        for handle in handles:
            handle.remove()
        for layer in get_family(model).moe_layers(model):
            index, weights = after[layer.index][0]
            skipper = layer.experts.diep_skipping
            computed = IDS.numel() * layer.top_k - int(skipper.skipped)
            assert int(skipper.skipped) > 0
            assert index.shape == weights.shape == (computed, 1)
            assert torch.all(index < layer.num_experts) and torch.all(weights != 0)


def test_a_batch_with_nothing_skipped_passes_through_untouched():
    model = pruned("mixtral")
    enable_skipping(model, forced_calibration(model, 0.0))
    before, handles = routing_recorder(model, after_skipping=False)
    after, more = routing_recorder(model, after_skipping=True)
    logits(model)
    for handle in handles + more:
        handle.remove()
    for index in before:
        assert torch.equal(before[index][0][0], after[index][0][0])
        assert torch.equal(before[index][0][1], after[index][0][1])


