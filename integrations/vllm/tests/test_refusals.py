# Copyright 2026 the diep_hub authors. Apache-2.0.
"""What the plugin refuses at load, each with a message naming why and what is allowed: diep families it does
not serve (DeepSeek-V2 with its reason, PhiMoE), and checkpoints whose tensors contradict their config.json."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import engine

SUPPORTED = ("diep_mixtral (DiepMixtralForCausalLM), diep_qwen2_moe (DiepQwen2MoeForCausalLM), "
             "diep_qwen3_moe (DiepQwen3MoeForCausalLM), diep_olmoe (DiepOlmoeForCausalLM)")


def _load_error(path, **overrides) -> str:
    with pytest.raises(Exception) as info, engine(path, **overrides):
        pass
    return str(info.value)


def test_deepseek_refused_with_reason(fixtures_dir):
    message = _load_error(fixtures_dir / "deepseek_v2")
    assert "diep-hub-vllm cannot serve the diep_deepseek_v2 checkpoint" in message
    assert "builds one model-wide expert mapping from n_routed_experts" in message
    assert f"Supported families: {SUPPORTED}" in message
    assert "stock_format=True" in message


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


def test_config_with_fewer_experts_than_weights_refused(fixtures_dir, tmp_path):
    def drop_one(config):  # layer 0 keeps 5 experts on disk; the config now says 4
        config["num_experts_per_layer"][0] = 4
        config["kept_expert_ids"][0] = config["kept_expert_ids"][0][:4]
        config.pop("diep_skipping")

    message = _load_error(_edited_copy(fixtures_dir, tmp_path, "mixtral", drop_one))
    assert "does not match its config.json num_experts_per_layer [4, 3, 8, 1]" in message
    assert "layers.0.block_sparse_moe.gate.weight has shape [5, 64] but the config gives [4, 64]" in message


def test_config_with_more_experts_than_weights_refused(fixtures_dir, tmp_path):
    def add_one(config):  # layer 0 keeps 3 experts (original ids 7, 1, 4) on disk; the config now says 4
        config["num_experts_per_layer"][0] = 4
        config["kept_expert_ids"][0] = config["kept_expert_ids"][0] + [0]
        config.pop("diep_skipping")

    message = _load_error(_edited_copy(fixtures_dir, tmp_path, "qwen3_moe", add_one))
    assert "does not match its config.json num_experts_per_layer [4, 7, 8, 1]" in message
    assert "layers.0.mlp.gate.weight has shape [3, 64] but the config gives [4, 64]" in message
    assert "layers.0.mlp.experts.3.gate_proj.weight is missing (layer 0 keeps 4 experts)" in message


def test_fused_tensor_with_wrong_expert_count_refused(fixtures_dir, tmp_path):
    def shrink(config):  # olmoe is saved fused: layer 1 holds experts.gate_up_proj of 5 experts
        config["num_experts_per_layer"][1] = 4
        config["kept_expert_ids"][1] = config["kept_expert_ids"][1][:4]
        config.pop("diep_skipping")

    message = _load_error(_edited_copy(fixtures_dir, tmp_path, "olmoe", shrink))
    assert "does not match its config.json num_experts_per_layer [2, 4, 1, 8]" in message
    assert "has shape [5, 64] but the config gives [4, 64]" in message


def test_skipping_asked_without_tables_refused(fixtures_dir, tmp_path):
    folder = _edited_copy(fixtures_dir, tmp_path, "mixtral", lambda config: config.pop("diep_skipping"))
    message = _load_error(folder, hf_overrides={"diep_skipping_enabled": True})
    assert "diep_skipping_enabled=True was asked for but config.json has no diep_skipping tables" in message
