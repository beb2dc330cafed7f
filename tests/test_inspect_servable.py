"""``diep-hub inspect`` says whether vLLM can serve a checkpoint: with the diep-hub-vllm plugin, without any plugin
(stock-format export), or not at all (a family the plugin refuses, with the plugin's reason)."""

from __future__ import annotations

import json

import diep_hub
from diep_hub.checkpoint.inspect import VLLM_PLUGIN_REFUSES, format_inspection, inspect_checkpoint
from diep_hub.checkpoint.layout import REPORT_FILE
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


def test_pruned_deepseek_v3_is_not_servable_and_says_why(tmp_path):
    # grouped routing (n_group=2): each layer keeps as many of group 0-3 as of 4-7, so the surgery itself is valid
    model = diep_hub.prune_experts(tiny_model("deepseek_v3"), {1: [0, 1, 4, 5], 2: [1, 2, 3, 5, 6, 7]})
    diep_hub.save_pruned(model, tmp_path / "deepseek")
    result = run_cli(["inspect", str(tmp_path / "deepseek"), "--json"])
    assert result.code == 0, result.stderr
    serving = json.loads(result.stdout)["serving"]
    assert serving["servable"] is False and serving["needs_plugin"] is True
    assert serving["reason"] == (
        f"diep-hub-vllm refuses diep_deepseek_v3: {VLLM_PLUGIN_REFUSES['diep_deepseek_v3']}; it serves "
        "diep_mixtral, diep_qwen2_moe, diep_qwen3_moe, diep_olmoe"
    )
    assert "one model-wide expert mapping from n_routed_experts" in serving["reason"]
    text = run_cli(["inspect", str(tmp_path / "deepseek")])
    assert text.code == 0
    assert "serving:     not servable by vLLM (diep-hub-vllm refuses diep_deepseek_v3: vLLM's DeepSeek" in text.stdout


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
