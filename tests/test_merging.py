"""merge_removed_experts: removed experts folded into their most similar kept expert before surgery.

Two constructed layers show what merging can and cannot do, with numbers:
- a removed expert that is an exact copy of a kept one (weights and router row): the merged weights are the
  kept expert's own, the pruned layer computes what the unpruned one did, and plain removal does too (nothing is
  lost when the expert is a duplicate, so merging cannot add anything there);
- a removed expert whose re-routed tokens land on a kept "spare" that the router never picks and that computes
  a scaled copy of it (the same direction, cosine 1): frequency weighting gives the spare the removed expert's
  weights, so after merge + surgery the layer output equals the unpruned one, while plain removal is off by the
  scale.
The frequency-weighted average is checked against an independent count of the router's choices on every family,
and the saved checkpoint against the kept counts (no tied copies).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import diep_hub
import diep_hub.modeling  # noqa: F401  (registers the diep_* Auto classes for the reload)
from diep_hub import KeepMapError
from diep_hub.criteria.capture import block_output, capture_block_inputs, weights_fingerprint
from diep_hub.errors import ConfigError
from diep_hub.families import get_family
from diep_hub.merging import MergedExpert, MergeGroup, apply_merges, merge_removed_experts, supports_alignment
from tests.helpers.numerics import assert_close_logits
from tests.helpers.tiny_models import FAMILIES, sample_input_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIBRATION = sample_input_ids(16, 16, seed=2)
EVAL_IDS = sample_input_ids(8, 16, seed=1)


def moe_layer(model, index):
    return {layer.index: layer for layer in get_family(model).moe_layers(model)}[index]


def layer_output_error(reference, candidate, index: int) -> float:
    """max |block output difference| / max |reference block output| on the tokens that reach MoE layer ``index``
    of the reference model (0: the same layer function; 2: off by twice the largest output)."""
    inputs = capture_block_inputs(reference, moe_layer(reference, index), EVAL_IDS, 4, progress=False)
    with torch.no_grad():
        expected = torch.cat([block_output(moe_layer(reference, index).block, h) for h in inputs])
        actual = torch.cat([block_output(moe_layer(candidate, index).block, h) for h in inputs])
    return float((actual - expected).abs().max() / expected.abs().max())


def merged_and_plain(model, keep, **kwargs):
    """(merge record, merged + pruned model, plainly pruned model), the input model untouched."""
    plain = diep_hub.prune_experts(copy.deepcopy(model), keep)
    merged = copy.deepcopy(model)
    record = merge_removed_experts(merged, keep, CALIBRATION, batch_size=4, **kwargs)
    return record, diep_hub.prune_experts(merged, keep), plain


@pytest.mark.parametrize("similarity", ["output_cosine", "output_cka"])
def test_exact_copy_is_merged_into_its_twin_and_loses_nothing(similarity):
    model = tiny_model("mixtral", num_experts_per_tok=1)
    index, kept_twin, copy_id = 1, 2, 5
    layer = moe_layer(model, index)
    with torch.no_grad():
        for tensor in (layer.router.weight, layer.experts.gate_up_proj, layer.experts.down_proj):
            tensor[copy_id] = tensor[kept_twin]
    original = {n: getattr(layer.experts, n).detach().clone() for n in ("gate_up_proj", "down_proj")}
    keep = {index: [e for e in range(8) if e != copy_id]}

    record, merged, plain = merged_and_plain(model, keep, similarity=similarity)

    assert record.partners(index) == {copy_id: kept_twin}
    assert record.groups[index][kept_twin].merged[0].similarity == pytest.approx(1.0, abs=1e-6)
    position = keep[index].index(kept_twin)
    for name, tensor in original.items():
        torch.testing.assert_close(getattr(moe_layer(merged, index).experts, name)[position], tensor[kept_twin],
                                   rtol=0, atol=1e-7)
    merged_error, plain_error = layer_output_error(model, merged, index), layer_output_error(model, plain, index)
    assert merged_error < 1e-5
    assert plain_error < 1e-5  # a duplicate costs nothing to remove: merging has nothing to add here


def spare_expert_model():
    """Mixtral, top-1: in MoE layer 0, kept expert 5 is never chosen (its router logit is always just below expert
    2's) and computes 3 x expert 2's output; expert 2 is removed, so its tokens fall to expert 5.

    Hidden dimension 7 is held at a positive constant at layer 0's router input (embedding column 7 = 1, attention
    writes nothing to it), and router row 5 = row 2 minus 1e-3 on that dimension: a strict, constant gap.
    """
    model = tiny_model("mixtral", num_experts_per_tok=1)
    removed, spare, dim = 2, 5, 7
    layer = moe_layer(model, 0)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dim] = 1.0
        model.model.layers[0].self_attn.o_proj.weight[dim] = 0.0
        layer.router.weight[:, dim] = 0.0
        layer.router.weight[spare] = layer.router.weight[removed]
        layer.router.weight[spare, dim] = -1e-3
        layer.experts.gate_up_proj[spare] = layer.experts.gate_up_proj[removed]
        layer.experts.down_proj[spare] = 3 * layer.experts.down_proj[removed]
    return model, removed, spare


def test_merge_recovers_the_unpruned_layer_where_plain_removal_does_not():
    model, removed, spare = spare_expert_model()
    keep = {0: [e for e in range(8) if e != removed]}

    record, merged, plain = merged_and_plain(model, keep)

    frequencies = record.frequencies[0]
    assert frequencies[spare] == 0 and frequencies[removed] > 0  # the construction holds on these tokens
    assert record.partners(0) == {removed: spare}
    group = record.groups[0][spare]
    assert group.weight == 0.0 and group.merged == (MergedExpert(removed, 1.0, group.merged[0].similarity),)
    assert group.merged[0].similarity == pytest.approx(1.0, abs=1e-6)
    merged_error, plain_error = layer_output_error(model, merged, 0), layer_output_error(model, plain, 0)
    assert merged_error < 1e-5
    assert plain_error > 0.5  # 2 x expert 2's output on every token it served
    with torch.no_grad():
        assert_close_logits(merged(EVAL_IDS).logits, model(EVAL_IDS).logits, "merged + pruned vs unpruned")
        assert (plain(EVAL_IDS).logits - model(EVAL_IDS).logits).abs().max() > 1e-3


def test_apply_merges_is_the_weighted_average():
    model = tiny_model("mixtral")
    layer = moe_layer(model, 0)
    with torch.no_grad():
        layer.experts.gate_up_proj[0] = 1.0
        layer.experts.gate_up_proj[3] = 5.0
        layer.experts.gate_up_proj[6] = -2.0
        layer.experts.down_proj[0] = 4.0
        layer.experts.down_proj[3] = 0.0
        layer.experts.down_proj[6] = 8.0
    group = MergeGroup(kept=0, weight=0.5, merged=(MergedExpert(3, 0.25, 0.9), MergedExpert(6, 0.25, 0.8)))

    apply_merges(layer, {0: group})

    # 0.5 * 1 + 0.25 * 5 + 0.25 * -2 = 1.25 and 0.5 * 4 + 0.25 * 0 + 0.25 * 8 = 4.0, exactly in float32
    assert torch.equal(layer.experts.gate_up_proj[0], torch.full_like(layer.experts.gate_up_proj[0], 1.25))
    assert torch.equal(layer.experts.down_proj[0], torch.full_like(layer.experts.down_proj[0], 4.0))
    assert torch.equal(layer.experts.gate_up_proj[3], torch.full_like(layer.experts.gate_up_proj[3], 5.0))


def router_counts(model, layers):
    """Top-k selections per expert over CALIBRATION, counted by a hook of the test's own."""
    counts = {index: torch.zeros(moe_layer(model, index).num_experts, dtype=torch.int64) for index in layers}

    def hook_for(index):
        def hook(_module, _args, output):
            chosen = output[2].reshape(-1)
            counts[index].add_(torch.bincount(chosen, minlength=counts[index].numel()))

        return hook

    handles = [moe_layer(model, i).router.register_forward_hook(hook_for(i)) for i in layers]
    with torch.no_grad():
        for batch in torch.split(CALIBRATION, 4):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return counts


def keep_map(model):
    """Half of the experts of every MoE layer but the last (group by group for grouped routing)."""
    layers = get_family(model).moe_layers(model)
    keep = {}
    for layer in layers[:-1]:
        n = layer.num_experts
        keep[layer.index] = [0, 1, 4, 5] if model.config.model_type == "deepseek_v3" else list(range(1, n, 2))
    return keep


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_weights_are_the_frequency_weighted_average(family):
    model = tiny_model(family)
    keep = keep_map(model)
    counts = router_counts(model, keep)
    before = weights_fingerprint(model)
    expert_names = get_family(model).expert_tensors

    record = merge_removed_experts(model, keep, CALIBRATION, batch_size=4, align="none")

    assert record.aligned == []
    after = weights_fingerprint(model)
    for index, kept in keep.items():
        assert record.frequencies[index] == counts[index].tolist()
        partners = record.partners(index)
        assert sorted(partners) == sorted(set(range(moe_layer(model, index).num_experts)) - set(kept))
        assert set(partners.values()) <= set(kept)
        prefix = f"model.layers.{index}.{get_family(model).block_attr}.experts."
        for name in expert_names:
            key = prefix + name
            for i in kept:
                members = [i] + [j for j, k in partners.items() if k == i]
                f = counts[index][members].to(torch.float64)
                weights = f / f.sum() if f.sum() > 0 else torch.full_like(f, 1 / len(members))
                expected = sum(w * before[key][e].to(torch.float64) for e, w in zip(members, weights))
                torch.testing.assert_close(after[key][i], expected.to(after[key].dtype), rtol=0, atol=2e-7)
                if len(members) == 1:
                    assert torch.equal(after[key][i], before[key][i])
            for j in partners:
                assert torch.equal(after[key][j], before[key][j])  # removed rows: left for surgery to drop
    untouched = [n for n in before if not any(n.endswith("experts." + e) for e in expert_names)]
    assert [n for n in untouched if not torch.equal(before[n], after[n])] == []


def permuted_twin_model():
    """Mixtral, top-1: in MoE layer 1, expert 5 is expert 2 with its 48 intermediate neurons shuffled (the same
    function, the same router row)."""
    model = tiny_model("mixtral", num_experts_per_tok=1)
    layer = moe_layer(model, 1)
    order = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
        layer.router.weight[5] = layer.router.weight[2]
        gate_up[5] = torch.cat([gate_up[2][:48][order], gate_up[2][48:][order]])
        down[5] = down[2][:, order]
    return model


def test_weight_matching_undoes_a_neuron_permutation():
    model = permuted_twin_model()
    twin = {n: getattr(moe_layer(model, 1).experts, n)[2].clone() for n in ("gate_up_proj", "down_proj")}
    keep = {1: [0, 1, 2, 3, 4, 6, 7]}

    record, aligned, plain = merged_and_plain(model, keep)
    unaligned_record, unaligned, _ = merged_and_plain(model, keep, align="none")

    assert record.partners(1) == unaligned_record.partners(1) == {5: 2}
    assert record.aligned == [1] and unaligned_record.aligned == []
    for name, tensor in twin.items():
        torch.testing.assert_close(getattr(moe_layer(aligned, 1).experts, name)[2], tensor, rtol=0, atol=1e-7)
        assert (getattr(moe_layer(unaligned, 1).experts, name)[2] - tensor).abs().max() > 1e-2
    aligned_error, unaligned_error = layer_output_error(model, aligned, 1), layer_output_error(model, unaligned, 1)
    assert aligned_error < 1e-5 and layer_output_error(model, plain, 1) < 1e-5
    assert unaligned_error > 0.05  # averaging unrelated neurons breaks the expert


@pytest.mark.parametrize("family", FAMILIES)
def test_alignment_is_applied_where_the_layout_allows(family):
    model = tiny_model(family)
    keep = keep_map(model)

    record = merge_removed_experts(model, keep, CALIBRATION, batch_size=4)

    expected = [] if family == "gpt_oss" else sorted(keep)  # GPT-OSS: interleaved, transposed, biased experts
    assert record.aligned == expected
    assert all(supports_alignment(moe_layer(model, i)) == (family != "gpt_oss") for i in keep)


def test_grouped_routing_merges_within_the_group():
    model = tiny_model("deepseek_v3")  # 8 experts in n_group=2 groups: 0-3 and 4-7
    keep = {1: [0, 1, 4, 5], 2: [2, 3, 6, 7]}

    record = merge_removed_experts(model, keep, CALIBRATION, batch_size=4)

    for index in keep:
        partners = record.partners(index)
        assert len(partners) == 4
        assert all(j // 4 == i // 4 for j, i in partners.items()), partners


def test_saved_checkpoint_holds_only_the_kept_experts(tmp_path):
    model = tiny_model("mixtral")
    total_before = sum(p.numel() for p in model.parameters())
    keep = keep_map(model)
    merge_removed_experts(model, keep, CALIBRATION, batch_size=4)
    pruned = diep_hub.prune_experts(model, keep)
    target = tmp_path / "merged"
    diep_hub.save_pruned(pruned, target, fused_weights=True)

    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()

    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    per_expert = 2 * inter * hidden + hidden * inter + hidden  # gate_up, down, router row
    removed = sum(8 - len(ids) for ids in keep.values())
    for index, ids in keep.items():
        layer = moe_layer(reloaded, index)
        assert layer.experts.gate_up_proj.shape[0] == layer.experts.down_proj.shape[0] == len(ids)
        assert layer.router.weight.shape[0] == len(ids)
    count = sum(p.numel() for p in reloaded.parameters())
    assert count == total_before - removed * per_expert
    on_disk = sum(t.numel() for file in target.glob("*.safetensors") for t in load_file(file).values())
    assert on_disk == count
    with torch.no_grad():
        assert_close_logits(reloaded(EVAL_IDS).logits, pruned(EVAL_IDS).logits, "reloaded merged checkpoint")


def test_refusals_change_nothing():
    model = tiny_model("mixtral")
    before = weights_fingerprint(model)
    with pytest.raises(KeepMapError, match="out of range"):
        merge_removed_experts(model, {0: [0, 1, 9]}, CALIBRATION)
    with pytest.raises(ConfigError, match=r"similarity='l2'.*\['output_cosine', 'output_cka'\]"):
        merge_removed_experts(model, {0: [0, 1]}, CALIBRATION, similarity="l2")
    with pytest.raises(ConfigError, match="max_tokens=1 must be an integer >= 2"):
        merge_removed_experts(model, {0: [0, 1]}, CALIBRATION, max_tokens=1)
    with pytest.raises(ConfigError, match=r"align='yes' is not a neuron alignment; choose one of \['weights', 'none"):
        merge_removed_experts(model, {0: [0, 1]}, CALIBRATION, align="yes")
    record = merge_removed_experts(model, {0: list(range(8))}, CALIBRATION, batch_size=4)
    assert record.groups == {} and record.num_merged == 0
    after = weights_fingerprint(model)
    assert [n for n in before if not torch.equal(before[n], after[n])] == []


def test_record_is_json_for_the_report():
    model, removed, spare = spare_expert_model()
    record = merge_removed_experts(model, {0: [e for e in range(8) if e != removed]}, CALIBRATION, batch_size=4)

    data = record.to_dict()

    assert data["similarity"] == "output_cosine" and data["weighting"] == "frequency" and data["num_merged"] == 1
    assert data["align"] == "weights" and data["aligned_layers"] == [0]
    assert data["merges"] == {"0": {str(spare): {"weight": 0.0, "merged": [
        {"expert": removed, "weight": 1.0, "similarity": pytest.approx(1.0, abs=1e-6)}]}}}
    assert data["tokens"] == {"0": 256} and data["calibration_tokens"] == 256
    assert record.summary_lines() == [f"layer 0: {spare} <- {removed} (1.00, sim 1.00)"]
