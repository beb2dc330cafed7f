# Copyright 2026 the diep_hub authors. Apache-2.0.
"""What the plugin refuses at load, each with a message naming why and what is allowed: diep families it does
not serve (PhiMoE), DeepSeek layers whose kept count cannot fill their routing groups (and `diep-hub inspect`
says the same), DeepSeek with ROCm AITER fused shared experts, and checkpoints whose tensors contradict their
config.json."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import engine
from make_checkpoints import bad_groups

SUPPORTED = ("diep_mixtral (DiepMixtralForCausalLM), diep_qwen2_moe (DiepQwen2MoeForCausalLM), "
             "diep_qwen3_moe (DiepQwen3MoeForCausalLM), diep_olmoe (DiepOlmoeForCausalLM), "
             "diep_deepseek_v2 (DiepDeepseekV2ForCausalLM), diep_deepseek_v3 (DiepDeepseekV3ForCausalLM)")


def _load_error(path, **overrides) -> str:
    with pytest.raises(Exception) as info, engine(path, **overrides):
        pass
    return str(info.value)


def test_other_family_refused_with_supported_list(fixtures_dir):
    message = _load_error(fixtures_dir / "phimoe")
    assert "diep-hub-vllm cannot serve the diep_phimoe checkpoint" in message
    assert f"Supported families: {SUPPORTED}" in message


def _edited_copy(fixtures_dir, tmp_path, name, edit):
    folder = tmp_path / name
    shutil.copytree(fixtures_dir / name, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_deepseek_groups_the_kept_count_cannot_fill_refused(fixtures_dir, manifest, tmp_path):
    """A layer keeping 6 experts cannot route in 4 equal groups: refused at load, and `diep-hub inspect` says so."""
    message = _load_error(_edited_copy(fixtures_dir, tmp_path, "deepseek_v3", bad_groups))
    assert "diep_deepseek_v3: layer 2 keeps 6 experts but n_group_per_layer[2] = 4: grouped routing splits a " \
           "layer's experts into n_group equal contiguous groups of at least 2, so the kept count must be a " \
           "multiple of 4 that is >= 8; prune with the same count from every group, or regroup the layer" in message
    inspect = manifest["inspect_bad_groups"]
    assert inspect["servable"] is False and inspect["needs_plugin"] is True
    assert inspect["reason"].startswith("diep-hub-vllm refuses this diep_deepseek_v3 checkpoint: layer 2 keeps 6 "
                                        "experts but routes with n_group=4, topk_group=1")


def test_deepseek_topk_group_that_cannot_supply_top_k_refused(fixtures_dir, tmp_path):
    def one_group_of_one(config):  # deepseek_v2: layer 2 keeps 4 experts in 2 groups; 4 groups of 1 cannot give 2
        config["n_group_per_layer"][2] = 4
        config.pop("diep_skipping")

    message = _load_error(_edited_copy(fixtures_dir, tmp_path, "deepseek_v2", one_group_of_one))
    assert "layer 2 keeps 4 experts in 4 groups of 1, and topk_group_per_layer[2] = 1 group(s) cannot supply " \
           "top-k = 2 experts; topk_group x experts per group must be >= top-k" in message


def test_deepseek_with_fused_shared_experts_refused(fixtures_dir, monkeypatch):
    """ROCm AITER's fused shared experts take slots after n_routed_experts (one model-wide count): refused."""
    from vllm.model_executor.models import deepseek_v2

    monkeypatch.setattr(deepseek_v2.rocm_aiter_ops, "is_fusion_moe_shared_experts_enabled", lambda: True)
    message = _load_error(fixtures_dir / "deepseek_v3")
    assert "diep-hub-vllm cannot serve diep_deepseek_v3 with ROCm AITER fused shared experts " \
           "(VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS=1)" in message
    assert "unset VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS" in message


def test_diep_hub_inspect_agrees_with_the_plugin(manifest):
    """`diep-hub inspect` (run by make_checkpoints.py in diep_hub's environment) calls every checkpoint the plugin
    serves in test_equality.py servable with the plugin, and the refused families not servable."""
    verdicts = {name: (entry["kind"], entry["inspect_serving"]["servable"], entry["inspect_serving"]["needs_plugin"])
                for name, entry in manifest["checkpoints"].items() if "inspect_serving" in entry}
    assert verdicts["deepseek_v2"] == verdicts["deepseek_v3"] == verdicts["deepseek_v3_regrouped"] == \
        ("diep", True, True)
    assert all(servable == (kind == "diep") and needs for kind, servable, needs in verdicts.values()), verdicts


def _set_layer_count(layer: int, count: int, extra_id: int | None = None):
    """A config.json edit: layer ``layer`` claims ``count`` experts (its kept ids cut, or ``extra_id`` added)."""

    def edit(config):
        config["num_experts_per_layer"][layer] = count
        ids = config["kept_expert_ids"][layer]
        config["kept_expert_ids"][layer] = ids[:count] if extra_id is None else ids + [extra_id]
        config.pop("diep_skipping")

    return edit


# (fixture, edit, words the load error must contain)
WEIGHT_MISMATCHES = {
    "fewer-experts-in-config": (  # layer 0 keeps 5 experts on disk; the config now says 4
        "mixtral", _set_layer_count(0, 4),
        ["does not match its config.json num_experts_per_layer [4, 3, 8, 1]",
         "layers.0.block_sparse_moe.gate.weight has shape [5, 64] but the config gives [4, 64]"]),
    "more-experts-in-config": (  # layer 0 keeps 3 experts (original ids 7, 1, 4) on disk; the config now says 4
        "qwen3_moe", _set_layer_count(0, 4, extra_id=0),
        ["does not match its config.json num_experts_per_layer [4, 7, 8, 1]",
         "layers.0.mlp.gate.weight has shape [3, 64] but the config gives [4, 64]",
         "layers.0.mlp.experts.3.gate_proj.weight is missing (layer 0 keeps 4 experts)"]),
    "fused-tensor-of-other-count": (  # olmoe is saved fused: layer 1 holds experts.gate_up_proj of 5 experts
        "olmoe", _set_layer_count(1, 4),
        ["does not match its config.json num_experts_per_layer [2, 4, 1, 8]",
         "has shape [5, 64] but the config gives [4, 64]"]),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_MISMATCHES))
def test_config_that_contradicts_the_weights_refused(case, fixtures_dir, tmp_path):
    name, edit, words = WEIGHT_MISMATCHES[case]
    message = _load_error(_edited_copy(fixtures_dir, tmp_path, name, edit))
    for expected in words:
        assert expected in message


def test_skipping_asked_without_tables_refused(fixtures_dir, tmp_path):
    folder = _edited_copy(fixtures_dir, tmp_path, "mixtral", lambda config: config.pop("diep_skipping"))
    message = _load_error(folder, hf_overrides={"diep_skipping_enabled": True})
    assert "diep_skipping_enabled=True was asked for but config.json has no diep_skipping tables" in message
