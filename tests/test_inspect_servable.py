"""``diep-hub inspect`` says whether vLLM can serve a checkpoint: with the diep-hub-vllm plugin, without any plugin
(stock-format export), or not at all (a family the plugin refuses, or DeepSeek routing groups its kept counts cannot
fill, with the plugin's reason)."""

from __future__ import annotations

import json

import diep_hub
from diep_hub.checkpoint.inspect import VLLM_PLUGIN_REFUSES, format_inspection, inspect_checkpoint, serving_support
from diep_hub.checkpoint.layout import CONFIG_FILE, REPORT_FILE
from diep_hub.checkpoint.report import PruningReport
from tests.helpers.fault_catalogue import run_cli
from tests.helpers.tiny_models import tiny_model


def test_pruned_mixtral_is_servable_with_the_plugin(tmp_path):
    model = diep_hub.prune_experts(tiny_model("mixtral"), {0: [0, 2, 3, 5, 7], 1: [1, 4, 6], 3: [2, 5]})
    diep_hub.save_pruned(model, tmp_path / "mixtral")
    info = inspect_checkpoint(tmp_path / "mixtral")
    assert info["model_type"] == "diep_mixtral"
    assert info["serving"] == {
        "servable": True, "needs_plugin": True,
        "reason": "install the diep-hub-vllm plugin (integrations/vllm), then vllm serve DIR --trust-remote-code",
    }
    assert ("serving:     servable by vLLM with the diep-hub-vllm plugin (install the diep-hub-vllm plugin "
            "(integrations/vllm), then vllm serve DIR --trust-remote-code)") in format_inspection(info).splitlines()


def test_pruned_deepseek_v3_with_valid_groups_is_servable_with_the_plugin(tmp_path):
    # grouped routing (n_group=2): each layer keeps as many of group 0-3 as of 4-7, so the plugin serves it
    model = diep_hub.prune_experts(tiny_model("deepseek_v3"), {1: [0, 1, 4, 5], 2: [1, 2, 3, 5, 6, 7]})
    diep_hub.save_pruned(model, tmp_path / "deepseek")
    result = run_cli(["inspect", str(tmp_path / "deepseek"), "--json"])
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["serving"] == {
        "servable": True, "needs_plugin": True,
        "reason": "install the diep-hub-vllm plugin (integrations/vllm), then vllm serve DIR --trust-remote-code",
    }


def test_deepseek_v3_whose_groups_the_kept_count_cannot_fill_is_not_servable_and_says_why(tmp_path):
    model = diep_hub.prune_experts(tiny_model("deepseek_v3"), {1: [0, 1, 4, 5], 2: [1, 2, 3, 5, 6, 7]})
    diep_hub.save_pruned(model, tmp_path / "deepseek")
    config_file = tmp_path / "deepseek" / CONFIG_FILE
    config = json.loads(config_file.read_text())
    assert config["n_group_per_layer"][2] == 2
    config["n_group_per_layer"][2] = 4  # 6 kept experts cannot form 4 equal groups
    config_file.write_text(json.dumps(config))
    result = run_cli(["inspect", str(tmp_path / "deepseek"), "--json"])
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["serving"] == {
        "servable": False, "needs_plugin": True,
        "reason": "diep-hub-vllm refuses this diep_deepseek_v3 checkpoint: layer 2 keeps 6 experts but routes with "
                  "n_group=4, topk_group=1: grouped routing needs the kept count split into n_group equal groups of "
                  "at least 2 and topk_group groups that supply top-k=2; prune with the same count from every group, "
                  "or regroup the layer",
    }
    text = run_cli(["inspect", str(tmp_path / "deepseek")])
    assert text.code == 0
    assert "serving:     not servable by vLLM (diep-hub-vllm refuses this diep_deepseek_v3 checkpoint: layer 2" in \
        text.stdout


def test_refused_family_is_not_servable_and_names_the_served_ones():
    assert serving_support({"model_type": "diep_phimoe"}) == {
        "servable": False, "needs_plugin": True,
        "reason": f"diep-hub-vllm refuses diep_phimoe: {VLLM_PLUGIN_REFUSES['diep_phimoe']}; it serves diep_mixtral, "
                  "diep_qwen2_moe, diep_qwen3_moe, diep_olmoe, diep_deepseek_v2, diep_deepseek_v3",
    }


def test_stock_format_export_is_servable_without_a_plugin(tmp_path):
    kept = {i: [0, 2, 4, 6, 7] for i in range(4)}
    model = diep_hub.prune_experts(tiny_model("mixtral"), kept)
    # the stock config has no per-layer fields: inspect reads the experts from the report, as `diep-hub run` writes it
    report = PruningReport(kept_ids=kept, experts_before={i: 8 for i in range(4)}, format="stock")
    diep_hub.save_pruned(model, tmp_path / "stock", stock_format=True, extra_files={REPORT_FILE: report.to_dict()})
    info = inspect_checkpoint(tmp_path / "stock")
    assert info["model_type"] == "mixtral"
    assert [r["kept"] for r in info["layers"]] == [5, 5, 5, 5]
    assert info["serving"] == {
        "servable": True, "needs_plugin": False,
        "reason": "stock mixtral format: vLLM's own model, no plugin needed",
    }
    assert ("serving:     servable by vLLM without a plugin (stock mixtral format: vLLM's own model, no plugin "
            "needed)") in format_inspection(info).splitlines()
