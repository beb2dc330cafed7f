"""MaskedKL (criteria/masked_kl.py): its caches reuse exactly what a full forward computes, so every KL (and NLL)
is the same number with or without them (compared exactly: the same computation on the same tokens), and they save
work (counted in forward passes, not timed). Its NLL is checked against the surgically pruned model's in float64
to a relative 1e-6 (masking and surgery: two routes to the same maths; the tolerance and why at that test).
"""

from __future__ import annotations

import pytest
import torch

from diep_hub.criteria.masked_kl import OBJECTIVES, MaskedKL, decoder_positions
from diep_hub.criteria.refinement import refine_keep_map
from diep_hub.families import get_family
from diep_hub.selection import select_experts
from tests.helpers.pruning import surgically_pruned
from tests.helpers.tiny_models import FAMILIES, float64_tiny_model, sample_input_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GROUPED = {"deepseek_v3": {"n_group": 2, "topk_group": 1}}
PLENTY = 2**30  # bytes: every cache fits


def _setup(family: str, seed: int = 0):
    model = tiny_model(family, **GROUPED.get(family, {}))
    layers = get_family(model).moe_layers(model)
    ids = sample_input_ids(batch=5, length=10, seed=seed)
    scores = {layer.index: torch.randn(layer.num_experts, generator=torch.Generator().manual_seed(layer.index))
              for layer in layers}
    base = select_experts(scores, model, sparsity=0.5, mode="uniform").keep
    return model, layers, ids, base


def _changed_at(base: dict[int, list[int]], layer, swap_in: int | None = None) -> dict[int, list[int]]:
    """``base`` with one expert of ``layer`` swapped for a removed one (a probe that changes that layer only)."""
    changed = {index: list(ids) for index, ids in base.items()}
    removed = [e for e in range(layer.num_experts) if e not in changed[layer.index]]
    changed[layer.index] = sorted(changed[layer.index][1:] + [removed[0] if swap_in is None else swap_in])
    return changed


def test_decoder_positions_find_each_moe_block_in_the_decoder_layers():
    model, layers, _, _ = _setup("deepseek_v3")  # first_k_dense_replace=1: decoder layer 0 is dense
    decoder_layers, positions = decoder_positions(model, layers)
    assert decoder_layers is model.model.layers
    assert positions == [1, 2, 3]
    assert all(any(m is layer.block for m in decoder_layers[p].modules()) for layer, p in zip(layers, positions))


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("family", FAMILIES)
def test_resumed_and_cached_measurements_equal_full_forwards_exactly(family, objective):
    model, layers, ids, base = _setup(family)
    probes = [base] + [_changed_at(base, layer) for layer in layers]
    probes.append({index: sorted(set(ids) | {0, 1, 2}) for index, ids in base.items()})  # changed everywhere

    plain = MaskedKL(model, layers, ids, batch_size=2, objective=objective)
    expected = plain.per_sequence(probes)
    plain.set_base(base)  # no cache: a base changes nothing
    assert plain.per_sequence(probes)[1][0] == expected[1][0]

    cached = MaskedKL(model, layers, ids, batch_size=2, cache_bytes=PLENTY, objective=objective)
    base_kl = cached.set_base(base)
    assert base_kl[0] == expected[0][0] and torch.equal(base_kl[1], expected[0][1])
    forwards_before = cached.forwards
    got = cached.per_sequence(probes)
    for (mean, per_sequence), (want_mean, want_per_sequence) in zip(got, expected):
        assert mean == want_mean
        assert torch.equal(per_sequence, want_per_sequence)
    assert expected[1][0] != expected[0][0]  # a changed layer moves the model: equal numbers would test nothing
    # The reference came from the cache and each probe ran only the layers from its change on (4 decoder layers:
    # a change at the first MoE layer runs all 4, at the last 1; the base itself only its last layer and the head),
    # so the probes cost at most 0.65 of a pass each on average; the plain measure ran 1 a keep map (and, for the KL,
    # 1 of the unpruned reference).
    fresh = MaskedKL(model, layers, ids, batch_size=2, objective=objective)
    fresh.per_sequence(probes)
    assert fresh.forwards == pytest.approx((objective == "kl") + len(probes))
    assert cached.forwards - forwards_before <= 0.65 * len(probes)


def _nll_after_surgery(model, keep, ids) -> torch.Tensor:
    """Each sequence's mean next-token NLL under the surgically pruned model: what ``objective="nll"`` must match."""
    with torch.no_grad():
        log_probs = torch.log_softmax(surgically_pruned(model, keep)(ids).logits[:, :-1], dim=-1)
    return -log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(dim=-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_nll_objective_is_the_nll_of_the_surgically_pruned_model(family):
    # float64 and a relative 1e-6, as the KL's check against surgery (tests/test_choice_criterion.py): masking and
    # surgery are two routes to the same routing. The DeepSeek routers compute their logits in float32 even in a
    # float64 model, so those two agree to ~2e-9 only (on NLLs ~4.6), not to float64's 1e-10; the smallest change a
    # one-expert swap makes to these NLLs is 2.3e-4, 50x above the tolerance.
    model = float64_tiny_model(family, **GROUPED.get(family, {}))
    layers = get_family(model).moe_layers(model)
    ids = sample_input_ids(batch=3, length=11)
    _, _, _, keep = _setup(family)
    everything = {layer.index: list(range(layer.num_experts)) for layer in layers}
    nll = MaskedKL(model, layers, ids, batch_size=2, objective="nll")
    (mean, per_sequence), (unpruned_mean, unpruned_per_sequence) = nll.per_sequence([keep, everything])
    expected = _nll_after_surgery(model, keep, ids)
    assert per_sequence.tolist() == pytest.approx(expected.tolist(), rel=1e-6, abs=0.0)
    assert mean == pytest.approx(float(expected.mean()), rel=1e-6, abs=0.0)  # equal lengths: the sequences' mean
    assert unpruned_per_sequence.tolist() == pytest.approx(_nll_after_surgery(model, everything, ids).tolist(),
                                                           rel=1e-6, abs=0.0)
    assert abs(mean - unpruned_mean) > 1e-6  # removing half the experts moves the NLL: the check can fail
    assert nll.forwards == pytest.approx(2)  # one pass a keep map: the unpruned model never ran


def test_an_unknown_objective_or_too_short_sequences_are_refused_by_name():
    model, layers, ids, _ = _setup("mixtral")
    with pytest.raises(ValueError, match=r"objective='ce'; allowed: \['kl', 'nll'\]"):
        MaskedKL(model, layers, ids, batch_size=2, objective="ce")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        MaskedKL(model, layers, ids[:, :1], batch_size=2, objective="nll")


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_a_new_base_keeps_only_the_outputs_before_its_change_and_stays_exact(family):
    model, layers, ids, base = _setup(family, seed=1)
    cached = MaskedKL(model, layers, ids, batch_size=2, cache_bytes=PLENTY)
    plain = MaskedKL(model, layers, ids, batch_size=2)
    cached.set_base(base)
    moved = _changed_at(base, layers[-1])  # a move in the last MoE layer: the earlier outputs carry over
    assert cached.set_base(moved)[0] == plain.per_sequence([moved])[0][0]
    moved_again = _changed_at(moved, layers[0])  # then one in the first: everything is recomputed
    assert cached.set_base(moved_again)[0] == plain.per_sequence([moved_again])[0][0]
    probes = [_changed_at(moved_again, layer) for layer in layers]
    assert cached.means(probes) == plain.means(probes)


def test_a_small_budget_keeps_fewer_layer_outputs_and_the_same_numbers():
    model, layers, ids, base = _setup("mixtral")
    probes = [_changed_at(base, layer) for layer in layers]
    expected = MaskedKL(model, layers, ids, batch_size=5).means(probes)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    reference_bytes = 5 * 10 * vocab * 4
    one_layer = 5 * 10 * hidden * 4
    for budget, kept_layers in [(reference_bytes + one_layer, 1), (reference_bytes + 2 * one_layer, 2),
                                (reference_bytes + 10 * one_layer, 3), (reference_bytes - 1, 0)]:
        cached = MaskedKL(model, layers, ids, batch_size=5, cache_bytes=budget)
        cached.set_base(base)
        outputs = cached._base_outputs[0] if cached._base_outputs else {}
        assert len(outputs) == kept_layers, budget
        assert cached.means(probes) == expected
    # below the reference's size nothing is cached: every measurement recomputes it
    assert cached._references is None


def test_resuming_puts_back_an_instance_forward_such_as_accelerates():
    model, layers, ids, base = _setup("mixtral")
    first = model.model.layers[0]
    calls = []
    original = first.forward

    def wrapped(*args, **kwargs):  # what accelerate's add_hook_to_module installs: an instance-level forward
        calls.append(1)
        return original(*args, **kwargs)

    first.forward = wrapped
    cached = MaskedKL(model, layers, ids, batch_size=5, cache_bytes=PLENTY)
    cached.set_base(base)
    calls.clear()
    cached.means([_changed_at(base, layers[-1])])  # resumes after layer 0: its forward is skipped
    assert calls == []
    assert first.__dict__["forward"] is wrapped
    cached.means([_changed_at(base, layers[0])])  # changes layer 0: a full forward, through the wrapper
    assert calls == [1]


def _refinement_setup(family: str):
    """(model, layers, ids, global 50% selection, random scores, their keep map): a start random scores leave room to
    improve."""
    model, layers, ids, _ = _setup(family, seed=5)
    select = lambda scores: select_experts(scores, model, sparsity=0.5, mode="global")  # noqa: E731
    scores = {layer.index: torch.randn(layer.num_experts, generator=torch.Generator().manual_seed(7 + layer.index))
              for layer in layers}
    return model, layers, ids, select, scores, select(scores).keep


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_refinement_with_caches_takes_the_same_moves(family):
    model, layers, ids, select, scores, start = _refinement_setup(family)
    plain = refine_keep_map(model, layers, start, scores, select, ids, rounds=4, batch_size=3)
    measure = MaskedKL(model, layers, ids, batch_size=3, cache_bytes=PLENTY)
    cached = refine_keep_map(model, layers, start, scores, select, ids, rounds=4, batch_size=3, kl=measure)
    assert plain[1], "random scores leave room for a better map: a search that never moves tests nothing"
    assert cached == plain  # keep map, moves and the KL after each round, exactly
    without_cache = MaskedKL(model, layers, ids, batch_size=3)
    refine_keep_map(model, layers, start, scores, select, ids, rounds=4, batch_size=3, kl=without_cache)
    assert measure.forwards < 0.8 * without_cache.forwards


def test_nominal_shares_count_the_decoder_layers_from_the_first_change():
    """deepseek_v3's MoE blocks sit in decoder layers 1, 2 and 3 of 4: a keep map changed at the block in decoder
    layer p costs 1 - p / 4 of a pass, the base itself nothing, and with no base a full pass, whatever the cache
    holds."""
    model, layers, ids, base = _setup("deepseek_v3")
    for cache_bytes in (0, PLENTY):
        measure = MaskedKL(model, layers, ids, batch_size=2, cache_bytes=cache_bytes)
        changed = [_changed_at(base, layer) for layer in layers]
        assert measure.nominal_shares(changed) == [1.0, 1.0, 1.0]
        measure.set_base(base)
        assert measure.nominal_shares([*changed, base]) == [0.75, 0.5, 0.25, 0.0]
        both = _changed_at(changed[2], layers[1])
        assert measure.nominal_shares([both]) == [0.5]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_a_bounded_refinement_takes_the_same_moves_with_any_cache(family):
    """The budget is counted in nominal passes, so where it binds it binds alike with and without the caches."""
    model, layers, ids, select, scores, start = _refinement_setup(family)
    unbounded = refine_keep_map(model, layers, start, scores, select, ids, rounds=4, batch_size=3, probe_width=0)
    bound = unbounded.passes / 2
    results = [refine_keep_map(model, layers, start, scores, select, ids, rounds=4, batch_size=3, probe_width=0,
                               kl=MaskedKL(model, layers, ids, batch_size=3, cache_bytes=cache_bytes),
                               max_passes=bound)
               for cache_bytes in (0, PLENTY)]
    assert results[0] == results[1]
    assert results[0].passes <= bound < unbounded.passes


def test_validated_choice_chooses_the_same_with_and_without_caches():
    from diep_hub.criteria.base import get_criterion
    from tests.helpers.scoring import scoring_context

    model = tiny_model("olmoe", seed=2)
    ids = sample_input_ids(batch=12, length=12, seed=4)
    results = []
    for cache_mb in (0, 64):
        context = scoring_context(model, ids, batch_size=4, sparsity=0.5,
                                  options={"cache_mb": cache_mb, "refine_sequences": 8})
        context.select = lambda scores, mode="global": select_experts(scores, model, sparsity=0.5, mode=mode)
        results.append(get_criterion("validated_choice")().score(context))
    uncached, cached = results
    assert any(r["moves"] for r in cached.details["refinements"].values()), "no move: nothing was resumed"
    for index in uncached.scores:
        assert torch.equal(cached.scores[index], uncached.scores[index])
    assert cached.details["candidates"] == uncached.details["candidates"]
    assert cached.details["refinements"] == uncached.details["refinements"]
    assert cached.ranking == uncached.ranking
    # the judging reuses the unpruned log-probabilities: 1 pass over the held-out sequences for them, then one a
    # keep map judged (3) and one a refined map with a move; uncached, every call computes them again
    passes, passes_uncached = cached.details["forward_passes"], uncached.details["forward_passes"]
    refined = sum(bool(r["moves"]) for r in cached.details["refinements"].values())
    assert passes["judging"] == pytest.approx(1 + 3 + refined)
    assert passes_uncached["judging"] == pytest.approx(1 + 3 + 2 * refined)
    assert passes["refining"] < 0.8 * passes_uncached["refining"]


def test_a_keep_map_offered_as_base_becomes_the_base_without_a_forward():
    model, layers, ids, base = _setup("olmoe", seed=3)
    plain = MaskedKL(model, layers, ids, batch_size=2)
    cached = MaskedKL(model, layers, ids, batch_size=2, cache_bytes=PLENTY)
    cached.set_base(base)
    moves = [_changed_at(base, layer) for layer in layers[1:]]
    measured = cached.per_sequence(moves, offer_as_base=True)
    before = cached.forwards
    adopted = cached.set_base(moves[1])
    assert cached.forwards == before  # no forward: the measurement above stored its outputs
    assert adopted[0] == measured[1][0] == plain.per_sequence([moves[1]])[0][0]
    probes = [_changed_at(moves[1], layer) for layer in layers]
    assert cached.means(probes) == plain.means(probes)  # resumed from the adopted outputs: still exact
    # without the offer (or with a budget that holds only the base's outputs), set_base measures as before
    cached.means(moves)
    cached.set_base(moves[0])
    assert cached.forwards > before
    one_layer = 5 * 10 * model.config.hidden_size * 4
    tight = MaskedKL(model, layers, ids, batch_size=2, cache_bytes=5 * 10 * model.config.vocab_size * 4 + 3 * one_layer)
    tight.set_base(base)
    tight.per_sequence(moves, offer_as_base=True)
    before = tight.forwards
    assert tight.set_base(moves[1])[0] == adopted[0] and tight.forwards > before
    assert tight.means(probes) == plain.means(probes)
