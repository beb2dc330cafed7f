"""Adaptive expert skipping through a checkpoint: saved, reloaded once in a fresh process that never imports diep_hub
(tests/helpers/fresh_process.py), with the load-time switch and generation through the remote code.

A reloaded checkpoint is another computation (its tensors may be aligned differently, so kernels round
differently): its weights must be identical, its routing and logits within tests/helpers/numerics.py's tolerance,
and its skip decisions identical except where the decision margin |w_e - gamma * w_e0| is within rounding.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import diep_hub
from diep_hub.families import get_family
from diep_hub.skipping import (
    calibrate_skipping,
    enable_skipping,
    reset_skip_counters,
    skip_rates,
)
from tests.helpers.fresh_process import reload_each_family
from tests.helpers.numerics import assert_close_logits, assert_same_greedy, assert_same_skips, same_weights
from tests.helpers.skipping_models import IDS, logits, pruned, routing_recorder
from tests.helpers.tiny_models import FAMILIES


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
    remote, _ = reload_each_family(
        root,
        FAMILIES,
        IDS,
        """
        skippers = {i: layer.mlp.experts.diep_skipping if hasattr(layer, "mlp") else
                    layer.block_sparse_moe.experts.diep_skipping
                    for i, layer in enumerate(model.model.layers)
                    if "diep_skipping" in getattr(getattr(layer, "mlp", None) or layer.block_sparse_moe,
                                                  "experts", torch.nn.Module()).__dict__}
        routing = {}
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
        out[family] = {
            "logits": logits,
            "counts": {i: (int(s.skipped), s.slots) for i, s in skippers.items()},
            "masks": {i: s.record for i, s in skippers.items()},
            "routing": routing,
            "state_dict": model.state_dict(),
            "off_logits": off_logits,
            "off_enabled": off.config.diep_skipping["enabled"],
            "off_hooks": sum("diep_skipping" in m.__dict__ for m in off.modules()),
            "class_module": type(model).__module__,
        }
        """,
    )
    return root, expected, remote


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


# Generation and a forward given the KV cache under the old name (as callers before 5.24 pass it), with warnings kept.
GENERATE = """
skippers = [m.diep_skipping for m in model.modules() if "diep_skipping" in m.__dict__]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
        cached = model(ids, use_cache=True)
        model(ids[:, -1:], past_key_values=cached.cache)
out[family] = {
    "class_module": type(model).__module__,
    "generated": generated.tolist(),
    "skipped": sum(int(s.skipped) for s in skippers),
    "warnings": [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                 if issubclass(w.category, (FutureWarning, DeprecationWarning))],
}
"""


def test_generation_through_remote_code_with_skipping_warns_nothing(skipping_checkpoints):
    """Issue 14 point 7: the remote code hands transformers the KV cache as ``cache`` (5.24 deprecates
    ``past_key_values``), so generating (and a forward given the cache under either name) raises neither
    "`past_key_values` is deprecated" nor "Both `past_key_values` and `cache` are set", with skipping on."""
    root, _, _ = skipping_checkpoints
    prompt = IDS[:2, :6].tolist()
    out, stderr = reload_each_family(root, FAMILIES, IDS[:2, :6].clone(), GENERATE, env={"PYTHONWARNINGS": "default"})
    assert out["diep_hub_imported"] is False
    assert "past_key_values" not in stderr  # transformers' logged deprecation of the old name
    for family in FAMILIES:
        got = out[family]
        assert got["class_module"].startswith("transformers_modules"), family
        assert got["warnings"] == [], family
        assert got["skipped"] > 0, f"{family}: no expert was skipped, so the skipping path did not run"
        assert [row[:6] for row in got["generated"]] == prompt, family
        assert all(len(row) == 10 and all(isinstance(t, int) for t in row) for row in got["generated"]), family
