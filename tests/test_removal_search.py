"""The removal-aware search (criteria/removal.py): its gates act where surgery acts, and its search is sound.

A gate of 0 must route exactly as surgery does (compared with the surgically pruned model within
tests/helpers/numerics.py's tolerance and on greedy tokens: two computations of the same maths), a gate of 1 must leave
the model as it is, and the search must leave the weights bit-identical, be deterministic for a seed and meet its
budget's bookkeeping.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import diep_hub
from diep_hub.criteria.base import get_criterion
from diep_hub.criteria.removal import (
    initial_theta,
    keep_probability,
    sample_gates,
    theta_for_probability,
    validate_options,
)
from diep_hub.criteria.router_bias import removal_bias, router_logit_bias
from diep_hub.errors import ConfigError
from diep_hub.families import get_family
from tests.helpers.numerics import assert_close_logits, assert_same_greedy
from tests.helpers.scoring import scoring_context
from tests.helpers.tiny_models import FAMILIES, sample_input_ids, tiny_model

# Grouped routing: the removal keeps the same count from every group, as surgery requires.
GROUPED = {"deepseek_v3": {"n_group": 2, "topk_group": 1}}


def _removal_keep_map(model) -> dict[int, list[int]]:
    """Drop a different set of experts in every MoE layer, keeping at least the family's floor (and, with groups,
    the same count from each group)."""
    keep = {}
    for position, layer in enumerate(get_family(model).moe_layers(model)):
        n = layer.num_experts
        groups = getattr(layer.router, "num_group", 1) or 1
        size = n // groups
        per_group = max(2, size - 1 - position % 2) if groups > 1 else None
        if per_group is not None:
            keep[layer.index] = [g * size + (e + position) % size for g in range(groups) for e in range(per_group)]
            keep[layer.index] = sorted(keep[layer.index])
        else:
            kept = max(get_family(model).layer_floor(model.config), n - 3 - position % 2)
            keep[layer.index] = sorted((e * 3 + position) % n for e in range(kept))
    return keep


def _gated_logits(model, layers, keep, ids) -> torch.Tensor:
    biases = removal_bias(layers, keep)
    with torch.no_grad(), router_logit_bias(layers, lambda position: biases[position]):
        return model(ids).logits


def test_the_bias_runs_the_router_once_through_an_instance_forward_and_puts_it_back():
    model = tiny_model("mixtral")
    layers = get_family(model).moe_layers(model)
    router = layers[0].router
    plain = router.forward
    widths = []

    def wrapped(*args, **kwargs):  # what accelerate's add_hook_to_module installs: an instance-level forward
        widths.append(args[0].shape[-1])
        return plain(*args, **kwargs)

    router.forward = wrapped
    keep = _removal_keep_map(model)
    biases = removal_bias(layers, keep)
    hidden = torch.randn(12, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), router_logit_bias(layers, lambda position: biases[position]):
        routed = router(hidden)
    # one routing, of the hidden states extended by the bias column: the unbiased one is never computed
    assert widths == [model.config.hidden_size + 1]
    removed = set(range(layers[0].num_experts)) - set(keep[layers[0].index])
    assert removed and not set(routed[2].reshape(-1).tolist()) & removed
    assert router.__dict__["forward"] is wrapped
    del router.forward
    with router_logit_bias(layers, lambda position: biases[position]):
        pass
    assert all("forward" not in layer.router.__dict__ for layer in layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_gates_route_as_surgery_does(family):
    model = tiny_model(family, **GROUPED.get(family, {}))
    layers = get_family(model).moe_layers(model)
    keep = _removal_keep_map(model)
    assert all(len(keep[layer.index]) < layer.num_experts for layer in layers)
    ids = sample_input_ids()

    gated = _gated_logits(model, layers, keep, ids)
    pruned = diep_hub.prune_experts(copy.deepcopy(model), keep)
    with torch.no_grad():
        reference = pruned(ids).logits
    assert_close_logits(gated, reference, "logits with zero gates vs surgery")
    assert_same_greedy(gated, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_of_one_leave_the_model_unchanged(family):
    model = tiny_model(family)
    layers = get_family(model).moe_layers(model)
    ids = sample_input_ids()
    with torch.no_grad():
        plain = model(ids).logits
    keep_all = {layer.index: list(range(layer.num_experts)) for layer in layers}
    assert_close_logits(_gated_logits(model, layers, keep_all, ids), plain, "logits with every gate at 1")


def test_hard_concrete_gates_and_their_probability():
    theta = torch.tensor([-4.0, -1.0, 0.0, 1.0, 4.0])
    generator = torch.Generator().manual_seed(0)
    samples = torch.stack([sample_gates(theta, generator) for _ in range(4000)])
    assert samples.min() == 0.0 and samples.max() == 1.0
    empirical = (samples > 0).float().mean(dim=0)
    # 4000 Bernoulli draws: a standard error of at most 0.008; 0.04 is five of them
    assert torch.allclose(empirical, keep_probability(theta), atol=0.04)
    probability = torch.tensor([0.01, 0.3, 0.5, 0.9])
    assert torch.allclose(keep_probability(theta_for_probability(probability)), probability, atol=1e-6)


def _context(model, sparsity=0.5, seed=0, **options):
    ids = sample_input_ids(batch=8, length=16, seed=3)
    return scoring_context(model, ids, batch_size=4, seed=seed, sparsity=sparsity, options={"epochs": 2, **options})


def test_initial_keep_probabilities_follow_soft_frequency_and_sum_to_the_budget():
    model = tiny_model("mixtral")
    context = _context(model)
    theta = initial_theta(context, "soft_frequency", 2.0, kept_target=16)
    probability = torch.cat([keep_probability(t) for t in theta.values()])
    assert probability.sum().item() == pytest.approx(16, abs=1e-3)
    context.options = {"progress": False}
    usage = get_criterion("soft_frequency")().score(context).scores
    relative = torch.cat([usage[i] * len(usage[i]) / usage[i].sum() for i in sorted(usage)])
    assert torch.equal(torch.argsort(probability, stable=True), torch.argsort(relative, stable=True))


@pytest.mark.parametrize("estimator", ["reinforce", "concrete"])
def test_search_leaves_weights_untouched_is_deterministic_and_reports_its_budget(estimator):
    model = tiny_model("qwen2_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    criterion = get_criterion("diep_removal")()
    first = criterion.score(_context(model, sparsity=0.25, estimator=estimator))
    second = criterion.score(_context(model, sparsity=0.25, estimator=estimator))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert first.scores.keys() == second.scores.keys()
    assert all(torch.equal(first.scores[i], second.scores[i]) for i in first.scores)
    total = sum(len(s) for s in first.scores.values())
    assert first.details["kept_target"] == total - round(0.25 * total)
    assert all(((s > 0) & (s < 1)).all() for s in first.scores.values())
    steps = 2 * math.ceil(8 / 4)
    assert len(first.details["loss_curve"]) == steps
    other_seed = criterion.score(_context(model, sparsity=0.25, seed=1, estimator=estimator))
    assert any(not torch.equal(first.scores[i], other_seed.scores[i]) for i in first.scores)


def test_the_search_needs_the_sparsity():
    model = tiny_model("mixtral")
    with pytest.raises(ConfigError, match=r"needs the target sparsity in \(0, 1\), got None"):
        get_criterion("diep_removal")().score(_context(model, sparsity=None))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 0}, "invalid diep_removal options: epochs: 0 -> is out of range; allowed: [1, inf)"),
        ({"lr": float("nan")}, "lr: nan -> must be a finite number in (0, inf)"),
        ({"budget_weight": -1}, "budget_weight: -1 -> is out of range; allowed: [0, inf)"),
        ({"init": "nope"}, "init: 'nope' -> Input should be 'soft_frequency', 'reap', 'frequency' or 'uniform'"),
        ({"estimator": "x"}, "estimator: 'x' -> Input should be 'reinforce' or 'concrete'"),
        ({"masks": 1}, "masks: 1 -> is out of range; allowed: [2, inf)"),
        ({"bogus": 1}, "unknown diep_removal option(s) ['bogus']"),
    ],
)
def test_bad_options_are_refused_with_the_field_and_what_is_allowed(options, message):
    with pytest.raises(ConfigError) as info:
        validate_options(options)
    assert message in str(info.value)


def test_the_pruner_runs_the_search_at_its_own_sparsity_and_keeps_the_top_scores():
    """End to end through DiEPPruner: the search is told the run's sparsity, and the keep map is the global top of
    its scores (the budget's count), as selection makes it."""
    from diep_hub.pruner import DiEPPruner
    from diep_hub.selection import select_experts
    from tests.helpers.word_tokenizer import pruner_texts, pruner_tokenizer

    original = tiny_model("mixtral")
    pruner = DiEPPruner(
        sparsity=0.25, method="diep_removal", dataset=pruner_texts(), num_samples=8, seq_len=16, batch_size=4,
        progress=False,
    )
    assert pruner.selection == "global"
    model = pruner.prune_model(copy.deepcopy(original), pruner_tokenizer())
    details = pruner.report.details
    assert details["sparsity"] == 0.25 and details["kept_target"] == 32 - 8
    scores = {int(i): torch.tensor(v) for i, v in pruner.report.scores.items()}
    expected = select_experts(scores, original, sparsity=0.25, mode="global").keep
    kept = {i: list(ids) for i, ids in enumerate(model.config.kept_expert_ids) if ids is not None}
    assert kept == {i: sorted(ids) for i, ids in expected.items()}
    assert sum(len(ids) for ids in kept.values()) == 24


def test_reinforce_masks_never_leave_a_layer_below_top_k_and_follow_the_score_function():
    """With every keep probability near 0, each mask still keeps each layer's top-k most likely experts; the
    gradient left on theta is the leave-one-out estimate sum_i A_i (m_i - p) / M, recomputed here by hand."""
    from diep_hub.criteria.removal import RemovalAwareCriterion, validate_options

    model = tiny_model("mixtral")
    layers = get_family(model).moe_layers(model)
    theta = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.linspace(-12.0, -8.0, layer.num_experts)) for layer in layers]
    )
    ids = sample_input_ids(batch=4, length=16, seed=3)
    gates: dict[int, torch.Tensor] = {}
    seen: list[list[torch.Tensor]] = []
    losses: list[float] = []
    original = RemovalAwareCriterion.__dict__["_reinforce_step"].__func__

    import diep_hub.criteria.removal as removal

    real_loss = removal.DiEPCriterion._loss

    def recording_loss(model_, batch, target, device):
        seen.append([gates[p].clone() for p in range(len(layers))])
        ce, recon = real_loss(model_, batch, target, device)
        losses.append(float(ce) + 0.01 * float(recon))
        return ce, recon

    opts = validate_options({"masks": 3})
    with torch.no_grad():
        targets = torch.zeros(4, 16, model.config.hidden_size)
    removal.DiEPCriterion._loss = staticmethod(recording_loss)
    try:
        with router_logit_bias(layers, lambda p: torch.log(gates[p].clamp_min(1e-12))):
            original(theta, gates, layers, opts, model, torch.Generator().manual_seed(0), ids, targets, "cpu")
    finally:
        removal.DiEPCriterion._loss = staticmethod(real_loss)
    assert len(seen) == 3
    for mask in seen:
        for position, layer in enumerate(layers):
            assert int(mask[position].sum()) == layer.top_k
            assert mask[position][-layer.top_k:].sum() == layer.top_k  # the most likely ones (largest theta)
    total = torch.tensor(losses)
    advantage = total - (total.sum() - total) / 2
    for position, location in enumerate(theta):
        p = keep_probability(location.detach())
        expected = sum(advantage[i] * (seen[i][position] - p) for i in range(3)) / 3
        assert torch.allclose(location.grad, expected, rtol=1e-5, atol=1e-7)


def test_uniform_counts_give_a_budget_per_layer_that_the_start_already_meets():
    """Under uniform selection the pruner passes each layer's count (num_to_keep): the start's keep probabilities
    sum to that count in every layer, and the report says the budget was per layer."""
    model = tiny_model("mixtral")
    counts = {layer.index: 5 for layer in get_family(model).moe_layers(model)}
    counts[0] = 3
    context = _context(model, sparsity=0.5)
    theta = initial_theta(context, "soft_frequency", 2.0, kept_target=sum(counts.values()), layer_targets=counts)
    for index, location in theta.items():
        assert keep_probability(location).sum().item() == pytest.approx(counts[index], abs=1e-3)
    context.num_to_keep = counts
    result = get_criterion("diep_removal")().score(context)
    assert result.details["budget"] == "per layer"
    assert result.details["kept_target"] == sum(counts.values())
    global_result = get_criterion("diep_removal")().score(_context(model, sparsity=0.5))
    assert global_result.details["budget"] == "global"
