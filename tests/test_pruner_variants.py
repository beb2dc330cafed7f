"""Expert merging and router recalibration through ``DiEPPruner``: recorded in the config, the report and the card,
and deterministic, so that ``reproduce`` can re-check the merged and recalibrated weights bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from diep_hub import ConfigError
from diep_hub.card import build_model_card
from diep_hub.checkpoint.layout import REPORT_FILE
from diep_hub.checkpoint.report import PruningReport
from diep_hub.pruner import DiEPPruner
from tests.helpers.tiny_models import tiny_model
from tests.helpers.word_tokenizer import pruner_texts, pruner_tokenizer

FAST = dict(num_samples=8, seq_len=16, batch_size=4, progress=False, method="frequency", sparsity=0.5)


def test_merge_and_recalibrate_through_the_pruner(tmp_path):
    pruner = DiEPPruner(dataset=pruner_texts(), merge="output_cosine", recalibrate_router=True,
                        recalibration_steps=4, **FAST)
    model = pruner.prune_model(tiny_model("mixtral"), pruner_tokenizer())
    report = pruner.report
    assert report.merging["num_merged"] == report.num_removed == 16
    assert report.recalibration["steps"] == 4 and report.recalibration["layers"] == [0, 1, 2, 3]
    assert model.config.diep_pruning["merge"] == "output_cosine"
    folder = pruner.save(model, tmp_path / "out", tokenizer=pruner_tokenizer())
    saved = json.loads((folder / REPORT_FILE).read_text())
    assert saved["merging"]["num_merged"] == 16 and "loss_before" in saved["recalibration"]
    again = PruningReport.from_dict(saved)
    assert again.merging == report.merging
    card = str(build_model_card(folder))
    assert "### Merged experts" in card and "### Router recalibration" in card
    other = DiEPPruner(dataset=pruner_texts(), merge="output_cosine", recalibrate_router=True,
                       recalibration_steps=4, **FAST)
    second = other.prune_model(tiny_model("mixtral"), pruner_tokenizer())
    a, b = model.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_merge_alignment_none_averages_the_neurons_as_stored(tmp_path):
    """``merge_alignment="none"`` reaches merging: the pruned weights equal merge_removed_experts(align="none") and
    surgery on the same keep map, bit for bit, and differ from the aligned default's; the record says which."""
    from diep_hub import prune_experts
    from diep_hub.calibration import load_calibration_data
    from diep_hub.merging import merge_removed_experts

    pruner = DiEPPruner(dataset=pruner_texts(), merge="output_cosine", merge_alignment="none", **FAST)
    model = pruner.prune_model(tiny_model("mixtral"), pruner_tokenizer())
    assert model.config.diep_pruning["merge_alignment"] == "none"
    assert pruner.report.merging["align"] == "none" and pruner.report.merging["aligned_layers"] == []
    keep = {int(layer): ids for layer, ids in pruner.report.kept_ids.items()}
    source, config_name, split = pruner.calibration_source()  # the pruner's own calibration tokens
    input_ids = load_calibration_data(source, pruner_tokenizer(), num_samples=FAST["num_samples"],
                                      seq_len=FAST["seq_len"], seed=pruner.seed, config_name=config_name,
                                      split=split, text_field=pruner.text_field)
    expected = tiny_model("mixtral")
    merge_removed_experts(expected, keep, input_ids, batch_size=FAST["batch_size"], align="none")
    expected = prune_experts(expected, keep)
    a, b = model.state_dict(), expected.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    aligned = DiEPPruner(dataset=pruner_texts(), merge="output_cosine", **FAST)
    aligned_model = aligned.prune_model(tiny_model("mixtral"), pruner_tokenizer())
    assert aligned.report.merging["aligned_layers"] == [0, 1, 2, 3]
    c = aligned_model.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if "experts" in k)
    cards = {name: str(build_model_card(p.save(m, tmp_path / name, tokenizer=pruner_tokenizer())))
             for name, p, m in (("none", pruner, model), ("weights", aligned, aligned_model))}
    assert "neurons averaged as stored, not aligned" in cards["none"] and "weight matching" not in cards["none"]
    assert "neurons aligned by weight matching" in cards["weights"] and "as stored" not in cards["weights"]


def test_bad_merge_is_refused():
    with pytest.raises(ConfigError, match="merge"):
        DiEPPruner(merge="mean")
    with pytest.raises(ConfigError, match=r"merge_alignment.*'weights'.*'none'"):
        DiEPPruner(merge_alignment="permute")


def test_output_scales_through_the_pruner(tmp_path):
    pruner = DiEPPruner(dataset=pruner_texts(), recalibrate_router=True, recalibration_output_scales=True,
                        recalibration_steps=4, recalibration_lr=1e-2, **FAST)
    model = pruner.prune_model(tiny_model("mixtral"), pruner_tokenizer())
    scales = pruner.report.recalibration["output_scales"]
    assert pruner.report.recalibration["applied"]
    kept = pruner.report.per_layer_kept
    assert sorted(scales) == ["0", "1", "2", "3"] and {int(i): len(v) for i, v in scales.items()} == {
        int(i): n for i, n in kept.items()}
    assert model.config.diep_pruning["recalibration_output_scales"] is True
    folder = pruner.save(model, tmp_path / "out", tokenizer=pruner_tokenizer())
    card = str(build_model_card(folder))
    values = [v for layer in scales.values() for v in layer]
    scale_range = f"{min(values):.3f} to {max(values):.3f}"
    assert f"folded into its output projection\n(`down_proj`): {scale_range} (per layer" in card
    again = DiEPPruner(dataset=pruner_texts(), recalibrate_router=True, recalibration_output_scales=True,
                       recalibration_steps=4, recalibration_lr=1e-2, **FAST)
    second = again.prune_model(tiny_model("mixtral"), pruner_tokenizer())
    a, b = model.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_output_scales_need_recalibration():
    with pytest.raises(ConfigError, match=r"recalibration_output_scales: True -> needs recalibrate_router: True"):
        DiEPPruner(recalibration_output_scales=True)


def test_prune_command_flags_set_merging_recalibration_and_scales(tmp_path, monkeypatch):
    """`diep-hub prune --merge ... --recalibrate --output-scales`: the recipe fields behind the flags reach the
    pruner (config.json and the report record them); --output-scales alone is refused, naming the flag."""
    import diep_hub.tiny
    from diep_hub.tiny import build_tiny_model
    from tests.helpers.fault_catalogue import run_cli

    monkeypatch.setattr(diep_hub.tiny, "build_offline_model",  # untrained: the flags, not the pruning, are tested
                        lambda model_id, *, dtype=torch.float32: build_tiny_model(seed=0, train_steps=0, dtype=dtype))
    common = ["prune", "diep-hub/tiny-mixtral", "--method", "frequency", "--dataset", "diep-hub/tiny-text",
              "--dataset-config", "", "--num-samples", "4", "--seq-len", "32", "--batch-size", "4"]
    refused = run_cli([*common, "--output", str(tmp_path / "refused"), "--output-scales"], monkeypatch)
    assert refused.code == 2 and "--output-scales: True -> needs router recalibration on" in refused.stderr
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "out"
    result = run_cli([*common, "--output", str(out), "--merge", "output_cka", "--merge-alignment", "none",
                      "--recalibrate", "--recalibration-steps", "3", "--recalibration-lr", "0.01", "--output-scales",
                      "--output-scale-lr", "0.05"], monkeypatch)
    assert result.code == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    record = config["diep_pruning"]
    assert (record["merge"], record["merge_alignment"], record["recalibrate_router"],
            record["recalibration_output_scales"]) == ("output_cka", "none", True, True)
    recalibration = json.loads((out / REPORT_FILE).read_text())["recalibration"]
    assert (recalibration["steps"], recalibration["lr"], recalibration["output_scale_lr"]) == (3, 0.01, 0.05)
    kept = dict(zip(map(str, range(4)), config["num_experts_per_layer"]))
    assert {layer: len(scales) for layer, scales in recalibration["output_scales"].items()} == kept


def test_merge_choices_are_mergings_own():
    """The pruner's, the recipe's and the flags' choices for merging are those merge_removed_experts accepts."""
    from typing import get_args

    from diep_hub.merging import ALIGNMENTS, SIMILARITIES
    from diep_hub.options import Merge, MergeAlignment

    assert get_args(get_args(Merge)[0]) == ("none", *SIMILARITIES)
    assert get_args(get_args(MergeAlignment)[0]) == ALIGNMENTS
