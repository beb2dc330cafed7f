"""Baseline criteria (random, frequency, soft_frequency, reap, naee): one table over families, values checked
against independent computations, planted-signal tests, and refusals."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

import diep_hub
from diep_hub.criteria import available_criteria, get_criterion
from diep_hub.criteria.capture import block_output, capture_block_inputs, weights_fingerprint
from diep_hub.criteria.naee import NAEECriterion
from diep_hub.errors import ConfigError, KeepMapError
from diep_hub.selection import select_experts
from diep_hub.surgery import active_groups, group_subsets
from tests.helpers.numerics import tolerance
from tests.helpers.scoring import score, scoring_context
from tests.helpers.tiny_models import FAMILIES, sample_input_ids, tiny_model

BASELINES = ["random", "frequency", "soft_frequency", "reap", "naee"]
MAIN_FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3"]
USELESS = [1, 5]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _context(model, input_ids, *, keep=6, seed=0, options=None, batch_size=2):
    return scoring_context(model, input_ids, batch_size=batch_size, seed=seed, keep=keep, options=options)


def _score(name, model, input_ids, **kwargs):
    return score(name, _context(model, input_ids, **kwargs))


def test_every_criterion_is_registered_by_importing_the_package():
    assert set(BASELINES) <= set(available_criteria())
    for name in BASELINES:
        cls = get_criterion(name)
        assert cls.name == name and cls.reference.startswith("https://arxiv.org/abs/")
        assert "Formula" in (__import__(cls.__module__, fromlist=["x"]).__doc__ or "")
    assert get_criterion("naee").needs_target_counts is True
    # NAEE's search fixes per-layer counts, so only uniform selection keeps the subsets it evaluated.
    assert get_criterion("naee").selections == ("uniform",)


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("name", BASELINES)
def test_table_shapes_determinism_and_untouched_weights(family_name, name):
    model = tiny_model(family_name)
    ids = sample_input_ids(4, 8)
    before = weights_fingerprint(model)
    first = _score(name, model, ids)
    second = _score(name, model, ids)
    after = weights_fingerprint(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a criterion changed the model's weights"
    assert model.training is False
    layers = diep_hub.get_family(model).moe_layers(model)
    assert set(first.scores) == {layer.index for layer in layers}
    for layer in layers:
        scores = first.scores[layer.index]
        assert scores.shape == (layer.num_experts,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
        assert torch.isfinite(scores).all()
        assert torch.equal(scores, second.scores[layer.index])
    assert isinstance(first.ranking, str) and first.ranking
    json.dumps(first.details)  # goes into pruning_report.json


@pytest.mark.parametrize("family_name", FAMILIES)
def test_a_shared_routing_pass_gives_each_criterion_its_own_result_in_one_pass(family_name):
    from diep_hub.criteria.capture import shared_routing_pass

    model = tiny_model(family_name, **({"n_group": 2, "topk_group": 1} if family_name == "deepseek_v3" else {}))
    ids = sample_input_ids(batch=5, length=9, seed=3)
    names = ["reap", "frequency", "soft_frequency"]
    alone = [_score(name, model, ids) for name in names]
    passes = []
    handle = model.get_input_embeddings().register_forward_hook(lambda *_: passes.append(1))
    try:
        together = shared_routing_pass([get_criterion(n)() for n in names], _context(model, ids))
    finally:
        handle.remove()
    assert len(passes) == 3  # one pass: 3 batches of 2, 2 and 1 sequences
    for name, one, shared in zip(names, alone, together):
        assert shared.ranking == one.ranking and shared.details == one.details, name
        for index, tensor in one.scores.items():
            assert torch.equal(shared.scores[index], tensor), (name, index)
    with pytest.raises(ConfigError, match="bogus"):  # refused before the pass, as each criterion's own pass does
        shared_routing_pass([get_criterion(n)() for n in names], _context(model, ids, options={"bogus": 1}))


def test_random_is_seeded_uniform():
    model = tiny_model("mixtral")
    ids = sample_input_ids(1, 4)
    a, b, c = (_score("random", model, ids, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(a.scores[i], b.scores[i]) for i in a.scores)
    assert not all(torch.equal(a.scores[i], c.scores[i]) for i in a.scores)
    values = torch.cat(list(a.scores.values()))
    assert values.min() >= 0 and values.max() < 1
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(a.scores[0], torch.rand(8, generator=generator))


def _router_inputs(model, layer, ids):
    """The tokens entering a layer's router, [T, H], through an independent path (block pre-hook capture)."""
    return torch.cat([h.reshape(-1, h.shape[-1]) for h in capture_block_inputs(model, layer, ids, 2, progress=False)])


@pytest.fixture(params=MAIN_FAMILIES)
def main_model(request):
    """A tiny model of each main family: softmax routing, a shared expert, grouped sigmoid routing."""
    return tiny_model(request.param)


def test_frequency_counts_match_router_top_k(main_model):
    model = main_model
    ids = sample_input_ids(4, 8)
    result = _score("frequency", model, ids)
    for layer in diep_hub.get_family(model).moe_layers(model):
        # Routed batch by batch, as the model's own forward routes them (same inputs, same shapes, so the same
        # router numbers): the counts are then exact, with no top-k near-tie that another product could flip.
        with torch.no_grad():
            index = torch.cat(
                [
                    layer.router(h.reshape(-1, h.shape[-1]))[2].reshape(-1)
                    for h in capture_block_inputs(model, layer, ids, 2, progress=False)
                ]
            )
        expected = torch.bincount(index, minlength=layer.num_experts).float()
        assert torch.equal(result.scores[layer.index], expected)
        assert result.scores[layer.index].sum() == ids.numel() * layer.top_k


def test_soft_frequency_is_mean_router_probability(main_model):
    model = main_model
    ids = sample_input_ids(4, 8)
    result = _score("soft_frequency", model, ids)
    sigmoid = model.config.model_type == "deepseek_v3"
    assert ("sigmoid" in result.ranking) is sigmoid
    for layer in diep_hub.get_family(model).moe_layers(model):
        hidden = _router_inputs(model, layer, ids)
        logits = hidden.float() @ layer.router.weight.float().T
        if sigmoid:
            probs = torch.sigmoid(logits)
            probs = probs / probs.sum(-1, keepdim=True)
        else:
            probs = torch.softmax(logits, dim=-1)
        torch.testing.assert_close(result.scores[layer.index], probs.mean(0), rtol=1e-5, atol=1e-6)
        assert result.scores[layer.index].sum().item() == pytest.approx(1.0, abs=1e-5)


def _manual_expert(layer, expert, x):
    """SwiGLU expert from the fused tensors, written out by hand (Mixtral / Qwen2-MoE / DeepSeek layout)."""
    gate, up = (x @ layer.experts.gate_up_proj[expert].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ layer.experts.down_proj[expert].T


def test_reap_matches_a_hand_computed_loop(main_model):
    model = main_model
    ids = sample_input_ids(3, 8)
    result = _score("reap", model, ids)
    for layer in diep_hub.get_family(model).moe_layers(model):
        hidden = _router_inputs(model, layer, ids)
        with torch.no_grad():
            _, weights, index = layer.router(hidden)
            sums = torch.zeros(layer.num_experts, dtype=torch.float64)
            counts = torch.zeros(layer.num_experts, dtype=torch.float64)
            for t in range(hidden.shape[0]):
                for s in range(index.shape[1]):
                    j = int(index[t, s])
                    sums[j] += float(weights[t, s]) * float(_manual_expert(layer, j, hidden[t]).norm())
                    counts[j] += 1
        expected = torch.where(counts > 0, sums / counts.clamp_min(1), 0.0).float()
        torch.testing.assert_close(result.scores[layer.index], expected, rtol=1e-4, atol=1e-7)
        assert result.details["routed_tokens"][str(layer.index)] == counts.long().tolist()


@pytest.mark.parametrize(("family_name", "keep"), [("mixtral", 6), ("qwen2_moe", 6), ("deepseek_v3", 6)])
def test_naee_errors_equal_those_of_really_pruned_blocks(family_name, keep):
    """NAEE's restricted routing is exactly what surgery builds: compare every subset's error on one layer."""
    model = tiny_model(family_name)
    ids = sample_input_ids(2, 8)
    layer = diep_hub.get_family(model).moe_layers(model)[0]
    context = _context(model, ids, keep=keep)
    best, _, errors = NAEECriterion._search_layer(context, layer, keep, False, 4096, {"progress": False})
    inputs = capture_block_inputs(model, layer, ids, 2, progress=False)
    with torch.no_grad():
        reference = [block_output(layer.block, h) for h in inputs]
    # NAEE searches exactly the subsets surgery accepts: all C(N, k) of them, or for DeepSeek-V3's grouped
    # routing (n_group=2) those with the same count from each group.
    accepted, brute = [], []
    for subset in itertools.combinations(range(layer.num_experts), keep):
        try:
            pruned = diep_hub.prune_experts(copy.deepcopy(model), {layer.index: list(subset)})
        except KeepMapError:
            continue
        accepted.append(subset)
        pruned_block = diep_hub.get_family(pruned).moe_layers(pruned)[0].block
        with torch.no_grad():
            squared = sum(float(((block_output(pruned_block, h) - r) ** 2).sum()) for h, r in zip(inputs, reference))
        brute.append(math.sqrt(squared))
    subsets = group_subsets(layer.num_experts, keep, active_groups(layer, model.config))
    assert subsets == accepted and len(errors) == len(subsets)
    expected_count = math.comb(4, keep // 2) ** 2 if family_name == "deepseek_v3" else math.comb(8, keep)
    assert len(subsets) == expected_count
    for ours, theirs in zip(errors.tolist(), brute):
        assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6)
    assert errors[subsets.index(best)].item() == pytest.approx(min(brute), rel=1e-4, abs=1e-6)


def test_naee_scores_put_the_best_subset_first_and_select_it():
    model = tiny_model("mixtral")
    ids = sample_input_ids(2, 8)
    result = _score("naee", model, ids, keep=5)
    for index, scores in result.scores.items():
        kept = result.details["kept"][str(index)]
        assert len(kept) == 5
        assert scores[kept].min() >= 1.0 and scores[[e for e in range(8) if e not in kept]].max() < 0.5
        assert result.details["subsets"][str(index)] == math.comb(8, 5)
    selection = select_experts(result.scores, model, sparsity=3 / 8, mode="uniform")
    assert selection.keep == {int(i): ids_ for i, ids_ in result.details["kept"].items()}


def test_naee_refuses_too_many_combinations_before_any_work():
    model = tiny_model("mixtral", num_local_experts=24)
    before = weights_fingerprint(model)
    with pytest.raises(ConfigError) as info:
        _score("naee", model, sample_input_ids(1, 4), keep=12)
    message = str(info.value)
    assert "layer 0" in message and "N=24" in message and "k=12" in message
    assert f"C(24, 12) = {math.comb(24, 12):,}" in message and "max_combinations=10,000" in message
    with pytest.raises(ConfigError, match=r"C\(8, 4\) = 70 subsets, above max_combinations=50\b"):
        _score("naee", tiny_model("mixtral"), sample_input_ids(1, 4), keep=4, options={"max_combinations": 50})
    assert all(torch.equal(before[k], v) for k, v in weights_fingerprint(model).items())


def test_naee_checks_its_inputs():
    model = tiny_model("mixtral")
    ids = sample_input_ids(1, 4)
    context = _context(model, ids)
    context.num_to_keep = None
    with pytest.raises(ConfigError, match="needs num_to_keep"):
        NAEECriterion().score(context)
    with pytest.raises(ConfigError, match=r"num_to_keep\[0\]=9 must be an integer between 1 and 8"):
        _score("naee", model, ids, keep=9)
    with pytest.raises(KeepMapError, match="needs at least 2"):
        _score("naee", model, ids, keep=1)
    with pytest.raises(KeepMapError, match="multiple of 2"):
        _score("naee", tiny_model("deepseek_v3"), ids, keep=5)
    with pytest.raises(ConfigError, match=r"unknown naee option\(s\) \['lr'\]"):
        _score("naee", model, ids, options={"lr": 1})
    with pytest.raises(ConfigError, match=r"unknown reap option\(s\) \['mode'\]"):
        _score("reap", model, ids, options={"mode": "dense"})
    with pytest.raises(ConfigError, match=r"batch_size=0 must be an integer >= 1"):
        _score("frequency", model, ids, batch_size=0)
    with pytest.raises(ConfigError, match=r"input_ids must be a non-empty tensor"):
        _score("reap", model, torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------------------------------------------------
# Planted signal: experts 1 and 5 of every layer are made useless (outputs scaled by 1e-4).


def _useless_experts_model(avoid_routing: bool):
    model = tiny_model("mixtral", seed=0)
    layers = diep_hub.get_family(model).moe_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.experts.down_proj[USELESS] *= 1e-4
        if avoid_routing:
            # Hidden dimension 0 carries a constant (embeddings set it, nothing else writes to it), so a router row
            # that reads only that dimension gives those experts a very negative logit for every token.
            model.model.embed_tokens.weight[:, 0] = 10.0
            for decoder_layer in model.model.layers:
                decoder_layer.self_attn.o_proj.weight[0, :] = 0
            for layer in layers:
                layer.experts.down_proj[:, 0, :] = 0
                layer.router.weight[:, 0] = 0
                layer.router.weight[USELESS] = 0
                layer.router.weight[USELESS, 0] = -20.0
    return model


def _assert_lowest(scores: dict, strict: bool = True):
    for index, layer_scores in scores.items():
        others = [e for e in range(layer_scores.shape[0]) if e not in USELESS]
        if strict:
            assert layer_scores[USELESS].max() < layer_scores[others].min(), f"layer {index}: {layer_scores.tolist()}"
        else:
            assert layer_scores[USELESS].max() <= layer_scores[others].min(), f"layer {index}: {layer_scores.tolist()}"


def test_planted_reap_ranks_useless_experts_lowest_with_normal_routing():
    model = _useless_experts_model(avoid_routing=False)
    ids = sample_input_ids(8, 32)
    result = _score("reap", model, ids, batch_size=4)
    _assert_lowest(result.scores)
    # They are routed to (so it is the output norm, not frequency, that REAP sees).
    assert all(min(result.details["routed_tokens"][str(i)][e] for e in USELESS) > 0 for i in result.scores)
    selection = select_experts(result.scores, model, sparsity=0.25, mode="uniform")
    assert all(sorted(set(range(8)) - set(kept)) == USELESS for kept in selection.keep.values())


@pytest.mark.parametrize("name", ["reap", "naee", "frequency", "soft_frequency"])
def test_planted_criteria_remove_useless_experts_the_router_avoids(name):
    model = _useless_experts_model(avoid_routing=True)
    ids = sample_input_ids(8, 32)
    result = _score(name, model, ids, keep=6, batch_size=4)
    _assert_lowest(result.scores)
    if name == "frequency":
        assert all(s[USELESS].sum() == 0 for s in result.scores.values())
    if name == "naee":
        # Removing experts the router never picks leaves the block's output unchanged, up to rounding only: the
        # search routes over the kept rows (a 6-row router product, not 8-row), so the best error is not exactly 0
        # but within the float32 tolerance of the block's output norm (measured: ~5e-8 of it; the next-best subset,
        # which drops a used expert, is ~0.15 of it).
        rtol = tolerance(torch.float32).rtol
        for layer in diep_hub.get_family(model).moe_layers(model):
            kept = result.details["kept"][str(layer.index)]
            assert kept == [e for e in range(8) if e not in USELESS], (layer.index, kept)
            with torch.no_grad():
                inputs = capture_block_inputs(model, layer, ids, 4, progress=False)
                norm = math.sqrt(sum(float((block_output(layer.block, h) ** 2).sum()) for h in inputs))
            assert result.details["best_error"][str(layer.index)] <= rtol * norm, (layer.index, norm)
    selection = select_experts(result.scores, model, sparsity=0.25)
    assert all(sorted(set(range(8)) - set(kept)) == USELESS for kept in selection.keep.values())
