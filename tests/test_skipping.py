"""Adaptive expert skipping: the rule, its calibration, its compute saving and its trip through a checkpoint.

Table-driven over every family in tests/tiny_models.FAMILIES; the checkpoint round trip runs once, in a fresh
process that never imports diep_hub.

Exactness: skip decisions made from the same numbers in the same process are compared bit for bit (mask against
the rule applied by hand, nothing-skipped pass-through, skipping off). A reloaded checkpoint is another
computation (its tensors may be aligned differently, so kernels round differently): its weights must be
identical, its routing and logits within tests/helpers/numerics.py's tolerance, and its skip decisions identical except
where the decision margin |w_e - gamma * w_e0| is within rounding.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import diep_hub
from diep_hub.cka import centered_gram_vector, cka, cka_matrix, mean_off_diagonal
from diep_hub.errors import ConfigError
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
from tests.helpers.numerics import assert_close_logits, assert_same_greedy, assert_same_skips, same_weights
from tests.helpers.tiny_models import FAMILIES, sample_input_ids, tiny_model

IDS = sample_input_ids(batch=3, length=12)


def keep_map(model) -> dict[int, list[int]]:
    """A non-uniform prune (6, 4, 8, ... experts in scrambled order) valid for every family's floors, and for
    DeepSeek's grouped routing (n_group=2: the same count from experts 0-3 and 4-7, group by group)."""
    layers = [layer.index for layer in get_family(model).moe_layers(model)]
    choices = [[3, 0, 2, 6, 4, 5], [1, 3, 7, 4], list(range(8))]
    return {index: choices[i % len(choices)] for i, index in enumerate(layers)}


def pruned(family: str, seed: int = 0):
    model = tiny_model(family, seed=seed)
    return diep_hub.prune_experts(model, keep_map(model))


def forced_calibration(model, gamma1: float, cka_value: float = 1.0) -> SkippingCalibration:
    """A calibration with chosen thresholds: cka_ratio filled with ``cka_value`` (diagonal 1)."""
    layers = {}
    for layer in get_family(model).moe_layers(model):
        n = layer.num_experts
        ratio = torch.full((n, n), cka_value)
        ratio.fill_diagonal_(1.0)
        layers[layer.index] = LayerSkipping(gamma1, ratio.clone(), ratio, 0, 0.0)
    return SkippingCalibration(kernel="linear", layers=layers, num_tokens=0, cka_tokens=0)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def routing_recorder(model, *, after_skipping: bool):
    """Pre-hooks recording (index, weights) each layer's experts receive: before or after the skipping hook."""
    seen: dict[int, list] = {}
    handles = []
    for layer in get_family(model).moe_layers(model):

        def hook(module, args, index=layer.index):
            seen.setdefault(index, []).append((args[1].clone(), args[2].detach().clone()))

        handles.append(layer.experts.register_forward_pre_hook(hook, prepend=not after_skipping))
    return seen, handles


# ---------------------------------------------------------------------------------------------------------------
# CKA


def test_linear_cka_equals_feature_space_formula_and_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 5, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        40, 5, generator=g, dtype=torch.float64
    )
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = float((yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm()))
    assert cka(x, y) == pytest.approx(expected, rel=1e-10)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert cka(x, 3.5 * x @ q + 2.0) == pytest.approx(1.0, abs=1e-10)  # orthogonal, scale and shift invariant
    assert 0.0 < cka(x, y) < 1.0


def test_rbf_cka_is_symmetric_bounded_and_one_on_itself():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 4, generator=g), torch.randn(30, 7, generator=g)
    assert cka(x, x, kernel="rbf") == pytest.approx(1.0, abs=1e-9)
    assert cka(x, y, kernel="rbf") == pytest.approx(cka(y, x, kernel="rbf"), abs=1e-12)
    assert 0.0 <= cka(x, y, kernel="rbf") < 1.0
    # RBF with the median heuristic is invariant to isotropic scaling
    assert cka(x, 10 * x, kernel="rbf") == pytest.approx(1.0, abs=1e-9)


def test_cka_matrix_handles_a_constant_representation():
    g = torch.Generator().manual_seed(2)
    reps = [torch.randn(20, 3, generator=g), torch.zeros(20, 3), torch.randn(20, 3, generator=g)]
    matrix = cka_matrix(torch.stack([centered_gram_vector(r) for r in reps]))
    assert torch.equal(matrix.diagonal(), torch.ones(3, dtype=matrix.dtype))
    assert matrix[1, 0] == 0 and matrix[0, 1] == 0 and matrix[1, 2] == 0
    assert matrix[0, 2] == pytest.approx(cka(reps[0], reps[2]), abs=1e-9)
    assert mean_off_diagonal(matrix) == pytest.approx(2 * float(matrix[0, 2]) / 6, abs=1e-12)


def test_cka_rejects_unknown_kernel():
    with pytest.raises(ConfigError, match="cosine"):
        cka(torch.randn(4, 2), torch.randn(4, 2), kernel="cosine")


# ---------------------------------------------------------------------------------------------------------------
# Calibration


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_statistics_match_an_independent_computation(family):
    model = pruned(family)
    seen, handles = routing_recorder(model, after_skipping=False)
    with torch.no_grad():
        model(IDS)
    for handle in handles:
        handle.remove()
    calibration = calibrate_skipping(model, IDS, batch_size=2, max_tokens_for_cka=24)
    for layer in get_family(model).moe_layers(model):
        index, weights = seen[layer.index][0]
        ordered = np.sort(weights.float().numpy(), axis=-1)[:, ::-1]  # descending, whatever the router returned
        expected_gamma1 = float(np.median(ordered[:, 1:] / ordered[:, :1]))
        got = calibration.layers[layer.index]
        assert got.gamma1 == pytest.approx(expected_gamma1, rel=1e-6)
        assert got.cka.shape == (layer.num_experts, layer.num_experts)
        assert torch.allclose(got.cka, got.cka.T) and torch.equal(got.cka.diagonal(), torch.ones(layer.num_experts))
        assert mean_off_diagonal(got.cka_ratio) == pytest.approx(1.0, rel=1e-5)
        assert got.num_slots == IDS.numel() * (layer.top_k - 1)
        assert 0.0 < got.calibration_skip_rate < 1.0
    config = calibration.to_config()
    assert json.loads(json.dumps(config)) == config
    assert set(config["layers"]) == {str(layer.index) for layer in get_family(model).moe_layers(model)}


def test_cka_table_uses_every_expert_on_the_same_tokens():
    """Two identical experts have CKA 1 with each other; the table is the CKA of their outputs."""
    model = tiny_model("mixtral")
    layer = get_family(model).moe_layers(model)[0]
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            getattr(layer.experts, name)[5].copy_(getattr(layer.experts, name)[2])
    calibration = calibrate_skipping(model, IDS, max_tokens_for_cka=30)
    table = calibration.layers[layer.index].cka
    assert table[2, 5] == pytest.approx(1.0, abs=1e-5)
    assert table[2, 3] < 0.999
    rbf = calibrate_skipping(model, IDS, kernel="rbf", max_tokens_for_cka=30)
    assert rbf.kernel == "rbf" and rbf.layers[layer.index].cka[2, 5] == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(rbf.layers[layer.index].cka, table)


def test_bad_inputs_raise_before_any_work():
    model = tiny_model("mixtral")
    with pytest.raises(ConfigError, match="kernel='cosine'"):
        calibrate_skipping(model, IDS, kernel="cosine")
    with pytest.raises(ConfigError, match="input_ids"):
        calibrate_skipping(model, IDS[0])
    with pytest.raises(ConfigError, match="batch_size"):
        calibrate_skipping(model, IDS, batch_size=0)
    with pytest.raises(ConfigError, match="max_tokens_for_cka"):
        calibrate_skipping(model, IDS, max_tokens_for_cka=1)
    with pytest.raises(ConfigError, match="SkippingCalibration"):
        enable_skipping(model, {"layers": {}})


def test_calibration_before_pruning_is_refused_on_the_pruned_model():
    model = tiny_model("mixtral")
    calibration = calibrate_skipping(model, IDS, max_tokens_for_cka=16)
    diep_hub.prune_experts(model, keep_map(model))
    with pytest.raises(ConfigError, match="calibrate skipping after pruning"):
        enable_skipping(model, calibration)
    assert getattr(model.config, "diep_skipping", None) is None


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


# ---------------------------------------------------------------------------------------------------------------
# Through a checkpoint, in a fresh process


def recorded_skipping_run(model, ids=IDS) -> dict:
    """One forward with skipping on, recording per MoE layer the routing its experts received before skipping
    (index, weights), the skip mask, the skip counters, and the logits (the same record the fresh process keeps)."""
    layers = get_family(model).moe_layers(model)
    for layer in layers:
        layer.experts.diep_skipping.record = []
    reset_skip_counters(model)
    routing, handles = routing_recorder(model, after_skipping=False)
    out = logits(model, ids)
    for handle in handles:
        handle.remove()
    skippers = {layer.index: layer.experts.diep_skipping for layer in layers}
    return {
        "logits": out,
        "routing": routing,
        "masks": {i: s.record for i, s in skippers.items()},
        "counts": {i: (int(s.skipped), s.slots) for i, s in skippers.items()},
    }


def causal_reach(diverged: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Tokens [B * L] at or after a diverged token of the same sequence: attention carries a token's change to
    every later position of its own sequence, never to earlier ones or to other sequences."""
    return (diverged.view(shape).cumsum(dim=1) > 0).reshape(-1)


def assert_same_skipping_run(got: dict, want: dict, skipping_config: dict, ids=IDS) -> None:
    """Another computation of the same skipping model (a reload) makes the same skip decisions and logits.

    Layer by layer: the routing and masks agree (``assert_same_skips``) on the tokens no earlier divergence
    reached; a decision within rounding that went the other way (or a top-k near-tie) makes that token and the
    later tokens of its sequence incomparable from there on. The counters count each run's own mask exactly;
    with no divergence the skip counts are identical. Logits are compared within tolerance, and on their greedy
    tokens, at every position no divergence reached (at least 90% of them)."""
    reached = torch.zeros(ids.numel(), dtype=torch.bool)
    decided_skips = 0
    for index in sorted(want["masks"]):
        (want_mask,), (got_mask,) = want["masks"][index], got["masks"][index]
        (want_routing,), (got_routing,) = want["routing"][index], got["routing"][index]
        layer = skipping_config["layers"][str(index)]
        gamma = torch.tensor(layer["cka_ratio"], dtype=torch.float32) * float(layer["gamma1"])
        result = assert_same_skips((*got_routing, got_mask), (*want_routing, want_mask), gamma, compare=~reached)
        reached |= causal_reach(result.diverged, ids.shape)
        decided_skips += result.skipped
        skipped, slots = got["counts"][index]
        assert (skipped, slots) == (int(got_mask.sum()), got_mask.shape[0] * (got_mask.shape[1] - 1))
        if not reached.any():
            assert (skipped, slots) == want["counts"][index], index
    assert decided_skips > 0, "no skip was decided on both sides: the comparison would be vacuous"
    positions = ~reached.view(ids.shape)
    assert positions.float().mean() >= 0.9, f"{int((~positions).sum())} of {ids.numel()} positions diverged"
    assert_close_logits(got["logits"][positions], want["logits"][positions])
    assert_same_greedy(got["logits"][positions], want["logits"][positions])


@pytest.fixture(scope="module")
def skipping_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("skipping")
    expected = {}
    for family in FAMILIES:
        model = pruned(family)
        plain = logits(model)
        enable_skipping(model, calibrate_skipping(model, IDS, max_tokens_for_cka=24))
        expected[family] = {"plain": plain, **recorded_skipping_run(model), "state_dict": model.state_dict()}
        diep_hub.save_pruned(model, root / family)
    torch.save(IDS, root / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(root / "ids.pt")!r})
        out = {{}}
        for family in {FAMILIES!r}:
            path = {str(root)!r} + "/" + family
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            skippers = {{i: layer.mlp.experts.diep_skipping if hasattr(layer, "mlp") else
                         layer.block_sparse_moe.experts.diep_skipping
                         for i, layer in enumerate(model.model.layers)
                         if "diep_skipping" in getattr(getattr(layer, "mlp", None) or layer.block_sparse_moe,
                                                       "experts", torch.nn.Module()).__dict__}}
            routing = {{}}
            for i, skipper in skippers.items():
                skipper.record = []
                experts = model.model.layers[i].mlp.experts if hasattr(model.model.layers[i], "mlp") else \
                    model.model.layers[i].block_sparse_moe.experts
                experts.register_forward_pre_hook(
                    lambda module, args, i=i: routing.setdefault(i, []).append((args[1].clone(), args[2].clone())),
                    prepend=True,
                )
            with torch.no_grad():
                logits = model(ids).logits
            off = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, diep_skipping_enabled=False)
            with torch.no_grad():
                off_logits = off.eval()(ids).logits
            out[family] = {{
                "logits": logits,
                "counts": {{i: (int(s.skipped), s.slots) for i, s in skippers.items()}},
                "masks": {{i: s.record for i, s in skippers.items()}},
                "routing": routing,
                "state_dict": model.state_dict(),
                "off_logits": off_logits,
                "off_enabled": off.config.diep_skipping["enabled"],
                "off_hooks": sum("diep_skipping" in m.__dict__ for m in off.modules()),
                "class_module": type(model).__module__,
            }}
        out["diep_hub_imported"] = any(name.startswith("diep_hub") for name in sys.modules)
        torch.save(out, {str(root / "remote.pt")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, expected, torch.load(root / "remote.pt", weights_only=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_reloaded_checkpoint_skips_the_same_tokens(skipping_checkpoints, family):
    root, expected, remote = skipping_checkpoints
    assert remote["diep_hub_imported"] is False
    got = remote[family]
    assert got["class_module"].startswith("transformers_modules")
    saved = json.loads((root / family / "config.json").read_text())["diep_skipping"]
    assert saved["enabled"] is True and "diep_skipping_enabled" not in json.loads(
        (root / family / "config.json").read_text()
    )
    assert set(got["masks"]) == set(expected[family]["masks"]) == {int(k) for k in saved["layers"]}
    assert same_weights(got["state_dict"], expected[family]["state_dict"]) == []
    assert_same_skipping_run(got, expected[family], saved)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_time_switch_turns_skipping_off(skipping_checkpoints, family):
    _, expected, remote = skipping_checkpoints
    got = remote[family]
    assert got["off_enabled"] is False and got["off_hooks"] == 0
    assert_close_logits(got["off_logits"], expected[family]["plain"])
    assert_same_greedy(got["off_logits"], expected[family]["plain"])


def test_load_time_switch_in_process(skipping_checkpoints):
    root, expected, _ = skipping_checkpoints
    model = AutoModelForCausalLM.from_pretrained(root / "mixtral", diep_skipping_enabled=False).eval()
    assert model.config.diep_skipping["enabled"] is False and skip_rates(model) == {}
    off = logits(model)
    assert_close_logits(off, expected["mixtral"]["plain"])
    assert_same_greedy(off, expected["mixtral"]["plain"])
    model = AutoModelForCausalLM.from_pretrained(root / "mixtral").eval()
    assert same_weights(model.state_dict(), expected["mixtral"]["state_dict"]) == []
    got = recorded_skipping_run(model)
    assert_same_skipping_run(got, expected["mixtral"], model.config.diep_skipping)
    assert skip_rates(model) == {i: skipped / slots for i, (skipped, slots) in got["counts"].items()}
    assert all(0 < rate < 1 and not math.isnan(rate) for rate in skip_rates(model).values())


GENERATE_SCRIPT = """
import json, sys, warnings
import torch
from transformers import AutoModelForCausalLM

root, families, ids = sys.argv[1], json.loads(sys.argv[2]), torch.tensor(json.loads(sys.argv[3]))
out = {}
for family in families:
    model = AutoModelForCausalLM.from_pretrained(root + "/" + family, trust_remote_code=True).eval()
    skippers = [m.diep_skipping for m in model.modules() if "diep_skipping" in m.__dict__]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=4, do_sample=False)
            cached = model(ids, use_cache=True)
            model(ids[:, -1:], past_key_values=cached.cache)  # the old name, as callers before 5.24 pass it
    out[family] = {
        "class_module": type(model).__module__,
        "generated": generated.tolist(),
        "skipped": sum(int(s.skipped) for s in skippers),
        "warnings": [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                     if issubclass(w.category, (FutureWarning, DeprecationWarning))],
    }
out["diep_hub_imported"] = any(name.startswith("diep_hub") for name in sys.modules)
print(json.dumps(out))
"""


def test_generation_through_remote_code_with_skipping_warns_nothing(skipping_checkpoints):
    """Issue 14 point 7: the remote code hands transformers the KV cache as ``cache`` (5.24 deprecates
    ``past_key_values``), so generating (and a forward given the cache under either name) raises neither
    "`past_key_values` is deprecated" nor "Both `past_key_values` and `cache` are set", with skipping on."""
    root, _, _ = skipping_checkpoints
    prompt = IDS[:2, :6].tolist()
    env = {**os.environ, "PYTHONPATH": "", "PYTHONWARNINGS": "default"}
    result = subprocess.run([sys.executable, "-c", GENERATE_SCRIPT, str(root), json.dumps(FAMILIES),
                             json.dumps(prompt)], cwd=root, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["diep_hub_imported"] is False
    assert "past_key_values" not in result.stderr  # transformers' logged deprecation of the old name
    for family in FAMILIES:
        got = out[family]
        assert got["class_module"].startswith("transformers_modules"), family
        assert got["warnings"] == [], family
        assert got["skipped"] > 0, f"{family}: no expert was skipped, so the skipping path did not run"
        assert [row[:6] for row in got["generated"]] == prompt, family
        assert all(len(row) == 10 and all(isinstance(t, int) for t in row) for row in got["generated"]), family
