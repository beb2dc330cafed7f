# Copyright 2026 the diep_hub authors. Apache-2.0.
"""The plugin's pieces without an engine: the skip rule against the checkpoint's own remote code, the switch
semantics, the weight checks (missing, unexpected, mis-shaped, fused tensors split per expert)."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from diep_hub_vllm.models import _refuse_expert_parallel
from diep_hub_vllm.plan import DiepServingError, read_plan
from diep_hub_vllm.routing import SkippingRouter, softmax_top_k
from diep_hub_vllm.weights import ExpertWeightCheck


def _config(folder, **changes):
    data = json.loads((folder / "config.json").read_text())
    data.update(changes)
    return SimpleNamespace(**data)


def _remote_skipping(folder):
    spec = importlib.util.spec_from_file_location("skipping_diep_under_test", folder / "skipping_diep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DiepExpertSkipping


@pytest.mark.parametrize("renormalize", [True, False])
def test_skip_rule_equals_remote_code(fixtures_dir, renormalize):
    """Same skip decisions and weights as the checkpoint's skipping_diep.py, on 4000 random routings; skipped slots
    come back as the token's primary expert (so vLLM's kernels leave the skipped expert uncomputed)."""
    config = _config(fixtures_dir / "mixtral")
    entry = config.diep_skipping["layers"]["0"]
    remote = _remote_skipping(fixtures_dir / "mixtral")(0, entry["gamma1"], entry["cka_ratio"])
    plan = read_plan(config)
    router = SkippingRouter(0, plan.layers[0].skipping)
    logits = torch.randn(4000, 5, generator=torch.Generator().manual_seed(0)) * 2
    weights, ids = softmax_top_k(logits, 2, renormalize)
    got_weights, got_ids = router(None, logits, 2, renormalize)
    skip = remote.decide(ids, weights)
    assert 0.05 < skip.float().mean() < 0.95  # the rule both skips and keeps on this sample
    primary = ids.gather(-1, weights.argmax(-1, keepdim=True)).expand_as(ids)
    assert torch.equal(got_ids.long(), torch.where(skip, primary, ids))
    torch.testing.assert_close(got_weights, remote.reweight(weights, skip), rtol=0, atol=0)
    assert torch.equal(got_weights == 0, skip)


def test_switch_semantics(fixtures_dir):
    folder = fixtures_dir / "olmoe"
    on = read_plan(_config(folder))
    assert on.skipping_enabled and on.skipping_reason == "config.json diep_skipping.enabled=True"
    assert sorted(i for i, p in on.layers.items() if p.skipping) == [0, 1, 3]
    assert on.layers[2].top_k == 1 and on.layers[2].num_experts == 1
    off = read_plan(_config(folder, diep_skipping_enabled=False))
    assert not off.skipping_enabled and all(p.skipping is None for p in off.layers.values())
    assert off.skipping_reason == "diep_skipping_enabled=False override"
    none = read_plan(_config(folder, diep_skipping=None))
    assert none.skipping_reason == "config.json has no diep_skipping tables"
    with pytest.raises(DiepServingError, match="diep_skipping_enabled=True was asked for but config.json has no"):
        read_plan(_config(folder, diep_skipping=None, diep_skipping_enabled=True))


def test_table_of_wrong_size_refused(fixtures_dir):
    config = _config(fixtures_dir / "mixtral")
    config.diep_skipping["layers"]["0"]["cka_ratio"] = [[1.0] * 4] * 4
    with pytest.raises(DiepServingError, match="layer 0 has a 4-row table but the layer keeps 5 experts"):
        read_plan(config)


def test_expert_parallel_refused():
    parallel = SimpleNamespace(enable_expert_parallel=True, enable_eplb=False)
    with pytest.raises(DiepServingError, match="does not support expert parallelism or EPLB"):
        _refuse_expert_parallel(SimpleNamespace(parallel_config=parallel))


def _check(fixtures_dir, name="mixtral"):
    config = _config(fixtures_dir / name)
    return ExpertWeightCheck(read_plan(config), config, "CKPT")


def _expert(layer, idx, leaf, shape=(64, 64)):
    return f"model.layers.{layer}.block_sparse_moe.experts.{idx}.{leaf}.weight", torch.zeros(shape)


def _complete(counts):
    names = []
    for layer, count in enumerate(counts):
        names.append((f"model.layers.{layer}.block_sparse_moe.gate.weight", torch.zeros(count, 64)))
        names += [_expert(layer, i, leaf) for i in range(count) for leaf in ("w1", "w2", "w3")]
    return names


def test_complete_checkpoint_passes(fixtures_dir):
    check = _check(fixtures_dir)
    weights = _complete([5, 3, 8, 1])
    assert [n for n, _ in check.stream(weights)] == [n for n, _ in weights]
    check.finish()


def test_missing_unexpected_and_misshaped_named(fixtures_dir):
    check = _check(fixtures_dir)
    weights = [w for w in _complete([5, 3, 8, 1]) if ".experts.2.w3." not in w[0] or ".layers.1." not in w[0]]
    weights.append(_expert(3, 1, "w1"))
    weights[0] = (weights[0][0], torch.zeros(6, 64))
    passed = [n for n, _ in check.stream(weights)]
    assert "model.layers.3.block_sparse_moe.experts.1.w1.weight" not in passed
    with pytest.raises(DiepServingError) as info:
        check.finish()
    message = str(info.value)
    assert message.startswith("checkpoint CKPT does not match its config.json num_experts_per_layer [5, 3, 8, 1] (3 ")
    assert "model.layers.0.block_sparse_moe.gate.weight has shape [6, 64] but the config gives [5, 64]" in message
    assert "model.layers.3.block_sparse_moe.experts.1.w1.weight is unexpected (layer 3 keeps 1 experts)" in message
    assert "layers.1.block_sparse_moe.experts.2.w3.weight is missing (layer 1 keeps 3 experts)" in message


def test_fused_tensors_split_per_expert(fixtures_dir):
    check = _check(fixtures_dir, "mixtral_fused")  # experts per layer [3, 6, 1, 8]
    gate_up = torch.arange(3 * 128 * 64, dtype=torch.float32).reshape(3, 128, 64)
    down = torch.arange(3 * 64 * 64, dtype=torch.float32).reshape(3, 64, 64)
    out = dict(check.stream([
        ("model.layers.0.mlp.experts.gate_up_proj", gate_up),
        ("model.layers.0.mlp.experts.down_proj", down),
        ("model.layers.0.mlp.gate.weight", torch.zeros(3, 64)),
    ]))
    prefix = "model.layers.0.block_sparse_moe"
    assert sorted(out) == sorted([f"{prefix}.gate.weight"] + [f"{prefix}.experts.{i}.{leaf}.weight"
                                                              for i in range(3) for leaf in ("w1", "w2", "w3")])
    assert torch.equal(out[f"{prefix}.experts.2.w1.weight"], gate_up[2, :64])
    assert torch.equal(out[f"{prefix}.experts.2.w3.weight"], gate_up[2, 64:])
    assert torch.equal(out[f"{prefix}.experts.1.w2.weight"], down[1])


def _inspect_literals() -> dict:
    """The plugin lists that diep_hub's inspect repeats (it cannot import this plugin), read as text."""
    import ast
    from pathlib import Path

    source = Path(__file__).resolve().parents[3] / "diep_hub" / "checkpoint" / "inspect.py"
    found = {}
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("VLLM_PLUGIN_SERVES", "VLLM_PLUGIN_REFUSES"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def test_diep_hub_inspect_lists_the_families_this_plugin_serves_and_refuses():
    """`diep-hub inspect` tells users what this plugin serves: its copy must equal plan.py, reasons included."""
    from diep_hub_vllm.plan import REFUSED, SUPPORTED

    lists = _inspect_literals()
    assert list(lists["VLLM_PLUGIN_SERVES"]) == list(SUPPORTED)
    assert lists["VLLM_PLUGIN_REFUSES"] == {model_type: reason for model_type, (_, reason) in REFUSED.items()}
