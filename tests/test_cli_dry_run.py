"""`diep-hub run --dry-run`: parameter and expert counts that match the real model, without loading any weights
(Mixtral-8x7B from its config alone)."""

from __future__ import annotations

import json

import pytest
import yaml

from diep_hub.cli import main
from diep_hub.tiny import build_tiny_model, tiny_config
from tests.helpers.console import ROOT

TINY = ROOT / "recipes" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("private_cache")


def test_dry_run_counts_match_the_real_model(capsys):
    assert main(["run", str(TINY), "--dry-run", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    est = result["estimate"]
    model, _ = build_tiny_model(train_steps=0)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert est["params_total"] == total
    assert est["params_experts"] == experts
    assert (est["experts_total"], est["experts_removed"], est["experts_kept"]) == (32, 16, 16)
    # 16 experts removed: their gate_up/down slices and router rows.
    cfg = tiny_config()
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size + cfg.hidden_size
    assert est["params_after_pruning"] == total - 16 * per_expert
    assert est["weight_bytes"] == total * 4
    assert result["recipe"]["model"]["id"] == "diep-hub/tiny-mixtral"


def test_dry_run_loads_no_weights_and_matches_mixtral_8x7b(tmp_path, capsys):
    """Mixtral-8x7B's real config in a folder holding only config.json: a run would fail, a dry run needs no weights.

    46.7B parameters, 12.9B active per token: the figures Mistral publishes.
    """
    from transformers import MixtralConfig

    model_dir = tmp_path / "mixtral-8x7b-config-only"
    MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
    ).save_pretrained(model_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"id": str(model_dir), "dtype": "bfloat16", "device_map": "auto"},
        # Offline (as tests run), the dry run's pre-checks refuse a Hub dataset such as allenai/c4: calibrate on
        # the offline corpus.
        "pruning": {"sparsity": 0.25, "selection": "uniform",
                    "calibration": {"dataset": "diep-hub/tiny-text", "config": None}},
    }))
    assert main(["run", str(recipe), "--dry-run", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)["estimate"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json"]
    assert est["params_total"] == 46_702_792_704
    assert est["params_active_per_token"] == 12_879_925_248
    assert est["weight_bytes"] == 2 * 46_702_792_704
    per_expert = 3 * 4096 * 14336 + 4096  # gate, up, down projections and the router row
    assert est["experts_removed"] == 2 * 32
    assert est["params_after_pruning"] == 46_702_792_704 - 64 * per_expert
