"""recalibrate_routers: a short distillation of the pruned layers' router rows, everything else a bit-identical slice.

Checked on families with different routers (softmax renormalised, softmax not renormalised, sigmoid with groups and
a selection bias, top-k on biased logits): the loss the record reports is recomputed here from the unpruned model's
logits, it goes down, and every tensor but the trained routers equals the unpruned model's tensor (or its rows at
the kept ids) bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import diep_hub
from diep_hub.criteria.capture import weights_fingerprint
from diep_hub.errors import ConfigError
from diep_hub.families import get_family
from diep_hub.recalibration import recalibrate_routers, teacher_hidden_states
from tests.helpers.tiny_models import sample_input_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIBRATION = sample_input_ids(16, 16, seed=2)


def sharp_model(family: str):
    """A tiny model whose LM head is scaled by 20: its random-weight logits are then sharp enough that the KL
    between pruned and unpruned (~1e-2) stands far above float32 rounding (~1e-7) instead of near it."""
    model = tiny_model(family)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def keep_map(model):
    """Half of the experts of every MoE layer but the last, which stays whole."""
    layers = get_family(model).moe_layers(model)
    grouped = model.config.model_type == "deepseek_v3"
    return {layer.index: [0, 1, 4, 5] if grouped else list(range(1, 8, 2)) for layer in layers[:-1]}


def kl_to_unpruned(base, pruned) -> float:
    """Token-mean KL(unpruned || pruned) of the next-token distributions on CALIBRATION, computed independently."""
    with torch.no_grad():
        teacher = F.log_softmax(base(CALIBRATION).logits.float(), -1).reshape(-1, base.config.vocab_size)
        student = F.log_softmax(pruned(CALIBRATION).logits.float(), -1).reshape(-1, base.config.vocab_size)
    return float((teacher.exp() * (teacher - student)).sum(-1).mean())


def router_key(model, index):
    family = get_family(model)
    return f"model.layers.{index}.{family.block_attr}.{family.router_attr}.weight"


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "deepseek_v3", "gpt_oss"])
def test_recalibration_lowers_the_loss_and_changes_only_pruned_routers(family):
    base = sharp_model(family)
    keep = keep_map(base)
    teacher = teacher_hidden_states(base, CALIBRATION, batch_size=4)
    original = weights_fingerprint(base)
    pruned = diep_hub.prune_experts(copy.deepcopy(base), keep)
    sliced = weights_fingerprint(pruned)

    record = recalibrate_routers(pruned, teacher, CALIBRATION, batch_size=4, steps=24, lr=1e-2)

    assert record.applied and record.steps == 24 and len(record.loss_curve) == 24
    assert record.layers == sorted(keep)
    assert record.loss_after < record.loss_before
    assert record.loss_before == pytest.approx(kl_to_unpruned(base, diep_hub.prune_experts(copy.deepcopy(base), keep)),
                                               rel=1e-4)
    assert record.loss_after == pytest.approx(kl_to_unpruned(base, pruned), rel=1e-4)
    after = weights_fingerprint(pruned)
    routers = {router_key(pruned, i) for i in keep}
    assert {n for n in after if not torch.equal(after[n], sliced[n])} == routers
    # everything else is the unpruned tensor, or its rows at the kept ids, bit for bit
    last = get_family(base).moe_layers(base)[-1].index
    for name, tensor in after.items():
        if name in routers:
            continue
        layer = next((i for i in keep if f"layers.{i}." in name), None)
        if layer is not None and tensor.shape != original[name].shape:
            expected = original[name].index_select(0, torch.tensor(keep[layer]))
        else:
            expected = original[name]
        assert torch.equal(tensor, expected), name
    assert torch.equal(after[router_key(pruned, last)], original[router_key(base, last)])
    for index in keep:
        assert after[router_key(pruned, index)].shape[0] == len(keep[index])


def test_teacher_model_and_cached_hidden_states_give_the_same_routers():
    base = sharp_model("mixtral")
    keep = keep_map(base)
    teacher = teacher_hidden_states(base, CALIBRATION, batch_size=4)
    from_cache = diep_hub.prune_experts(copy.deepcopy(base), keep)
    from_model = diep_hub.prune_experts(copy.deepcopy(base), keep)

    a = recalibrate_routers(from_cache, teacher, CALIBRATION, batch_size=4, steps=8, lr=1e-2, seed=3)
    b = recalibrate_routers(from_model, base, CALIBRATION, batch_size=4, steps=8, lr=1e-2, seed=3)

    # the full passes batch the rows alike, so the teacher's logits are the same numbers either way; training
    # batches are shuffled, and the teacher model then rounds a little differently in other batch compositions
    assert a.loss_before == b.loss_before
    assert a.loss_curve == pytest.approx(b.loss_curve, rel=1e-4)
    sliced = base.get_parameter(router_key(base, 0))[keep[0]]
    assert (from_cache.get_parameter(router_key(from_cache, 0)) - sliced).abs().max() > 1e-2
    for index in keep:
        torch.testing.assert_close(
            from_cache.get_parameter(router_key(from_cache, index)),
            from_model.get_parameter(router_key(from_model, index)),
            rtol=0,
            atol=1e-6,
        )


def test_training_that_does_not_help_is_undone():
    base = sharp_model("olmoe")
    pruned = diep_hub.prune_experts(base, keep_map(base))
    own = teacher_hidden_states(pruned, CALIBRATION, batch_size=4)  # its own outputs: nothing left to gain
    before = weights_fingerprint(pruned)

    record = recalibrate_routers(pruned, own, CALIBRATION, batch_size=4, steps=4, lr=1e-2)

    assert record.loss_before == 0.0 and record.loss_after == 0.0 and not record.applied
    after = weights_fingerprint(pruned)
    assert [n for n in before if not torch.equal(before[n], after[n])] == []
    assert record.to_dict()["applied"] is False


def test_refusals_change_nothing():
    base = tiny_model("mixtral")
    pruned = diep_hub.prune_experts(copy.deepcopy(base), keep_map(base))
    teacher = teacher_hidden_states(base, CALIBRATION, batch_size=4)
    before = weights_fingerprint(pruned)
    cases = [
        (dict(steps=0), "steps=0 must be an integer >= 1"),
        (dict(lr=2.0), r"lr=2.0 must be a number in \(0, 1\)"),
        (dict(output_scales=True, output_scale_lr=0.0), r"output_scale_lr=0.0 must be a number in \(0, 1\)"),
        (dict(layers=[0, 9]), r"layers=\[0, 9\]: \[9\] not MoE layer\(s\); MoE layers are \[0, 1, 2, 3\]"),
        (dict(layers="some"), r"layers='some': choose one of \['pruned', 'all'\]"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            recalibrate_routers(pruned, teacher, CALIBRATION, **kwargs)
    with pytest.raises(ConfigError, match=r"shape \(16, 15, 32\); expected \(16, 16, 32\)"):
        recalibrate_routers(pruned, teacher[:, :15], CALIBRATION)
    with pytest.raises(ConfigError, match="no MoE layer of this model has lost experts"):
        recalibrate_routers(tiny_model("mixtral"), teacher, CALIBRATION)
    after = weights_fingerprint(pruned)
    assert [n for n in before if not torch.equal(before[n], after[n])] == []


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_output_scales_are_trained_and_folded_into_the_output_tensors(family):
    base = sharp_model(family)
    with torch.no_grad():  # GPT-OSS's output bias starts at zero, which any scale leaves as it is
        for layer in get_family(base).moe_layers(base):
            bias = getattr(layer.experts, "down_proj_bias", None)
            if bias is not None:
                bias.copy_(0.05 * torch.randn(bias.shape, generator=torch.Generator().manual_seed(layer.index)))
    keep = keep_map(base)
    teacher = teacher_hidden_states(base, CALIBRATION, batch_size=4)
    pruned = diep_hub.prune_experts(copy.deepcopy(base), keep)
    sliced = weights_fingerprint(pruned)

    record = recalibrate_routers(pruned, teacher, CALIBRATION, batch_size=4, steps=24, lr=1e-2, output_scales=True)

    assert record.applied and record.loss_after < record.loss_before
    assert sorted(record.output_scales) == sorted(keep)
    assert all(len(record.output_scales[i]) == len(keep[i]) for i in keep)
    assert max(abs(v - 1.0) for scales in record.output_scales.values() for v in scales) > 1e-3
    # training measured the scales through the routing weights; the folded weights give that loss again
    assert record.loss_after == pytest.approx(kl_to_unpruned(base, pruned), rel=1e-4)
    family_ = get_family(pruned)
    after = weights_fingerprint(pruned)
    prefix = f"{family_.block_attr}.{family_.experts_attr}"
    scaled = {f"model.layers.{i}.{prefix}.{name}" for i in keep for name in family_.expert_output_tensors}
    assert scaled <= set(after)
    routers = {router_key(pruned, i) for i in keep}
    assert {n for n in after if not torch.equal(after[n], sliced[n])} == routers | scaled
    for name in scaled:
        layer = int(name.split(".")[2])
        scale = torch.tensor(record.output_scales[layer])  # the recorded float32 values, exactly
        expected = sliced[name] * scale.reshape(-1, *([1] * (sliced[name].dim() - 1)))
        assert torch.equal(after[name], expected), name
    saved = record.to_dict()
    assert set(saved["output_scales"]) == {str(i) for i in keep} and saved["output_scale_lr"] == 3e-2


def test_undone_training_leaves_output_tensors_as_sliced():
    base = sharp_model("mixtral")
    pruned = diep_hub.prune_experts(base, keep_map(base))
    own = teacher_hidden_states(pruned, CALIBRATION, batch_size=4)
    before = weights_fingerprint(pruned)

    record = recalibrate_routers(pruned, own, CALIBRATION, batch_size=4, steps=4, lr=1e-2, output_scales=True)

    assert not record.applied
    assert all(v == 1.0 for scales in record.output_scales.values() for v in scales)
    after = weights_fingerprint(pruned)
    assert [n for n in before if not torch.equal(before[n], after[n])] == []
