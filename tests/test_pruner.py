"""DiEPPruner: prune_model end to end, save/reload, re-pruning, and what the saved files record (its settings
are in test_pruner_settings.py).

Exactness: the same surgery in the same process is compared bit for bit; a reloaded checkpoint must hold the very
same weights, but its forward is another computation (loaded tensors may be aligned differently, so kernels round
differently): its logits are compared within tests/helpers/numerics.py's tolerance and on their greedy tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from diep_hub import ConfigError, prune_experts
from diep_hub.checkpoint.layout import PRUNER_CONFIG_FILE, REPORT_FILE
from diep_hub.pruner import DiEPPruner
from tests.helpers.numerics import assert_close_logits, assert_same_greedy, same_weights
from tests.helpers.pruning import fast_pruner
from tests.helpers.tiny_models import sample_input_ids, tiny_model
from tests.helpers.word_tokenizer import pruner_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------------------
# End to end
@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny Mixtral pruned at 50% by DiEP on a list of strings, and its saved folder."""
    torch.set_num_threads(1)
    tokenizer = pruner_tokenizer()
    pruner = fast_pruner(sparsity=0.5, method="diep")
    model = pruner.prune_model(tiny_model("mixtral"), tokenizer)
    folder = tmp_path_factory.mktemp("pruned") / "tiny-mixtral-diep-50"
    pruner.save(model, folder, tokenizer=tokenizer)
    return pruner, model, folder


def test_prune_model_removes_exactly_the_requested_count(pruned):
    pruner, model, _ = pruned
    counts = model.config.num_experts_per_layer
    assert type(model).__name__ == "DiepMixtralForCausalLM"
    assert sum(counts) == 16 and all(2 <= c <= 8 for c in counts)
    report = pruner.report
    assert report["num_removed"] == 16 and report["num_total"] == 32
    assert {int(k): len(v) for k, v in report["kept_ids"].items()} == dict(enumerate(counts))
    assert report["kept_original_ids"] == report["kept_ids"]  # first pruning: current ids are original ids
    assert [layer.mlp.experts.gate_up_proj.shape[0] for layer in model.model.layers] == counts
    assert [layer.mlp.gate.top_k for layer in model.model.layers] == [2, 2, 2, 2]
    # within a layer the kept experts are the highest-scored ones
    scores = {int(k): torch.tensor(v) for k, v in report["scores"].items()}
    for index, kept in report["kept_ids"].items():
        dropped = [i for i in range(8) if i not in kept]
        if dropped:
            assert scores[int(index)][dropped].max() <= scores[int(index)][kept].min()


def test_pruned_model_equals_surgery_with_the_reported_keep_map(pruned):
    pruner, model, _ = pruned
    keep = {int(k): v for k, v in pruner.report["kept_ids"].items()}
    reference = prune_experts(tiny_model("mixtral"), keep)
    ids = sample_input_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_pruning_configuration_recorded_in_config(pruned):
    pruner, model, folder = pruned
    record = model.config.diep_pruning
    assert record["method"] == "diep" and record["sparsity"] == 0.5 and record["selection"] == "global"
    assert record["ranking"] == "softmax(alpha)*beta" and record["seed"] == 0
    assert record["criterion_options"]["mode"] == pruner.search_mode
    saved = json.loads((folder / "config.json").read_text())
    assert saved["diep_pruning"]["method"] == "diep" and saved["diep_pruning"]["num_removed"] == 16


def test_saved_folder_reloads_with_remote_code_and_equal_logits(pruned):
    _, model, folder = pruned
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert reloaded.config.num_experts_per_layer == model.config.num_experts_per_layer
    assert same_weights(reloaded.state_dict(), model.state_dict()) == []
    ids = sample_input_ids(2, 11, seed=4)
    with torch.no_grad():
        got, expected = reloaded(ids).logits, model(ids).logits
    assert_close_logits(got, expected)
    assert_same_greedy(got, expected)


def test_pruning_report_fields(pruned):
    pruner, model, folder = pruned
    report = json.loads((folder / REPORT_FILE).read_text())
    assert report["method"] == "diep" and report["seed"] == 0 and report["sparsity"] == 0.5
    assert report["reference"] == "https://arxiv.org/abs/2509.16105"
    assert report["ranking"] == "softmax(alpha)*beta"
    assert "round_half_up" in report["rounding"]
    assert report["kept_ids"] == {str(i): ids for i, ids in enumerate(model.config.kept_expert_ids)}
    assert set(report["scores"]) == {"0", "1", "2", "3"} and all(len(v) == 8 for v in report["scores"].values())
    assert set(report["alpha"]) == set(report["beta"]) == {"0", "1", "2", "3"}
    assert all(len(a) == 8 for a in report["alpha"].values()) and all(b > 0 for b in report["beta"].values())
    # 8 sequences / batch 4 = 2 steps an epoch, 2 epochs
    assert len(report["loss_curve"]) == 4 and set(report["loss_curve"][0]) == {"total", "ce", "recon"}
    assert report["details"]["alpha_optimizer_steps"] == 3 and report["details"]["beta_optimizer_steps"] == 1
    for index, alpha in report["alpha"].items():
        expected = torch.softmax(torch.tensor(alpha), 0) * report["beta"][index]
        torch.testing.assert_close(torch.tensor(report["scores"][index]), expected)
    assert report["wall_seconds"] > 0 and report["scoring_seconds"] > 0
    memory = report["peak_memory"]
    assert memory["cpu_rss_peak_bytes"] >= memory["cpu_rss_start_bytes"] > 0
    assert memory["cpu_heap_peak_increase_bytes"] > 8 * 16 * 8  # at least the calibration tokens: 8 x 16 int64
    assert report["versions"]["torch"] == torch.__version__
    assert report["calibration_shape"] == [8, 16]
    assert report["config"] == json.loads((folder / PRUNER_CONFIG_FILE).read_text())
    assert DiEPPruner.from_dict(report["config"]).epochs == 2


def test_pruned_checkpoint_can_be_pruned_again(pruned, tmp_path):
    _, first_model, folder = pruned
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    first_counts = list(model.config.num_experts_per_layer)
    first_kept = [list(ids) for ids in model.config.kept_expert_ids]
    pruner = fast_pruner(sparsity=0.25, selection="global", method="frequency")
    model = pruner.prune_model(model, pruner_tokenizer())
    counts = model.config.num_experts_per_layer
    assert sum(counts) == 16 - 4
    assert pruner.report["num_total"] == 16 and pruner.report["num_removed"] == 4
    for layer, (before, after) in enumerate(zip(first_kept, model.config.kept_expert_ids, strict=True)):
        assert set(after) <= set(before)
        local = pruner.report["kept_ids"][str(layer)]
        assert after == [before[i] for i in local]  # ids compose: original ids of the kept local ids
    assert model.config.original_num_experts == first_model.config.original_num_experts
    assert model.config.diep_pruning["previous"]["method"] == "diep"
    assert model.config.diep_pruning["method"] == "frequency"
    assert counts != first_counts
    pruner.save(model, tmp_path / "twice")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "twice", trust_remote_code=True)
    assert same_weights(again.state_dict(), model.state_dict()) == []
    ids = sample_input_ids(2, 9)
    with torch.no_grad():
        got, expected = again(ids).logits, model(ids).logits
    assert_close_logits(got, expected)
    assert_same_greedy(got, expected)


def test_same_seed_same_keep_map():
    first = fast_pruner(sparsity=0.5)
    second = fast_pruner(sparsity=0.5)
    first.prune_model(tiny_model("qwen2_moe"), pruner_tokenizer())
    second.prune_model(tiny_model("qwen2_moe"), pruner_tokenizer())
    assert first.report["kept_ids"] == second.report["kept_ids"]
    assert first.report["scores"] == second.report["scores"]


def test_uniform_selection_on_deepseek_v3_with_regroup():
    pruner = fast_pruner(sparsity=0.5, selection="uniform", method="diep", search_mode="dense", regroup=True)
    model = pruner.prune_model(tiny_model("deepseek_v3"), pruner_tokenizer())
    assert model.config.num_experts_per_layer == [None, 4, 4, 4]
    assert pruner.report["details"]["mode"] == "dense"


def test_skipping_is_calibrated_after_pruning():
    pruner = fast_pruner(sparsity=0.25, skipping=True)
    model = pruner.prune_model(tiny_model("mixtral"), pruner_tokenizer())
    skipping = model.config.diep_skipping
    assert skipping["enabled"] is True
    for index, layer in skipping["layers"].items():
        size = model.config.num_experts_per_layer[int(index)]
        assert len(layer["cka_ratio"]) == size  # tables are per kept expert: calibrated after pruning
    assert set(pruner.report["skipping"]["layers"]) == set(skipping["layers"])


def test_naee_gets_uniform_subset_sizes_and_its_subsets_are_kept():
    # naee supports uniform selection only: an unset selection resolves to it (global is refused,
    # tests/test_naee_selection.py).
    pruner = fast_pruner(sparsity=0.5, method="naee")
    assert pruner.selection == "uniform"
    model = pruner.prune_model(tiny_model("mixtral"), pruner_tokenizer())
    assert model.config.num_experts_per_layer == [4, 4, 4, 4]
    assert pruner.report["selection"] == "uniform"
    assert pruner.report["kept_ids"] == pruner.report["details"]["kept"]
    for index, kept in pruner.report["kept_ids"].items():
        scores = torch.tensor(pruner.report["scores"][index])
        assert (scores[kept] >= 1).all() and (scores[[i for i in range(8) if i not in kept]] < 1).all()


def test_naee_refusal_names_the_limit_before_calibration(calibration_calls):
    model = tiny_model("mixtral")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"C\(8, 4\) = 70 subsets, above max_combinations=10"):
        fast_pruner(sparsity=0.5, method="naee", naee_max_combinations=10).prune_model(model, pruner_tokenizer())
    assert calibration_calls == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------------------
# What the saved files record: names, not this machine's paths; skipping as the model has it (issue 14, point 5)
def _saved_records(folder) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {
        "config": config,
        "report": json.loads((folder / REPORT_FILE).read_text()),
        "settings": json.loads((folder / PRUNER_CONFIG_FILE).read_text()),
    }


def test_offline_corpus_is_recorded_by_its_name_and_the_settings_reproduce(tmp_path, monkeypatch):
    from diep_hub.tiny import TINY_TEXT_ID, build_tiny_tokenizer

    cache = tmp_path / "diep-hub-cache"
    monkeypatch.setenv("DIEP_HUB_CACHE", str(cache))
    tokenizer = build_tiny_tokenizer()
    pruner = fast_pruner(dataset=TINY_TEXT_ID, method="frequency", sparsity=0.25)
    model = pruner.prune_model(tiny_model("mixtral"), tokenizer)
    assert any(cache.rglob("*.jsonl")), "the corpus was not read from diep_hub's cache: the test proves nothing"
    pruner.save(model, tmp_path / "out", tokenizer=tokenizer)
    saved = _saved_records(tmp_path / "out")
    assert saved["settings"]["dataset"] == TINY_TEXT_ID
    assert saved["report"]["config"]["dataset"] == TINY_TEXT_ID
    assert saved["report"]["calibration"]["dataset"] == TINY_TEXT_ID
    assert saved["config"]["diep_pruning"]["calibration"]["dataset"] == TINY_TEXT_ID
    for name in ("config.json", REPORT_FILE, PRUNER_CONFIG_FILE):
        assert str(tmp_path) not in (tmp_path / "out" / name).read_text(), name
    # the recorded settings are enough to prune again: the same corpus, the same experts
    again = DiEPPruner.from_dict(saved["settings"])
    again.prune_model(tiny_model("mixtral"), tokenizer)
    assert again.report.kept_ids == pruner.report.kept_ids


@pytest.mark.parametrize(
    "name_or_path, keyword, expected",
    [
        ("/root/.cache/huggingface/hub/models--org--tiny-moe/snapshots/0123abcd", None, "org/tiny-moe"),
        ("org/tiny-moe", None, "org/tiny-moe"),
        ("/srv/models/tiny-moe", None, None),  # a folder of this machine names nothing elsewhere
        ("~/models/tiny-moe", None, None),
        ("", "org/given", "org/given"),  # built in memory: the caller names it
        ("/srv/models/tiny-moe", "/home/me/.cache/huggingface/hub/models--org--given/snapshots/1", "org/given"),
    ],
)
def test_base_model_is_recorded_as_a_hub_id_never_a_local_path(name_or_path, keyword, expected):
    model = tiny_model("mixtral")
    model.name_or_path = name_or_path
    pruner = fast_pruner(method="frequency", sparsity=0.25)
    model = pruner.prune_model(model, pruner_tokenizer(), base_model=keyword)
    assert pruner.report.base_model == expected
    assert model.config.diep_pruning["base_model"] == expected


@pytest.mark.parametrize("pruner_skips", [False, True])
def test_saved_skipping_flag_follows_the_model(pruner_skips, tmp_path):
    """``skipping`` in diep_recipe.json and the report's settings is the saved model's state, as in config.json,
    whether the pruner calibrated it or it was switched on or off after pruning (the run's skipping stage)."""
    from diep_hub.skipping import calibrate_skipping, disable_skipping, enable_skipping

    pruner = fast_pruner(method="frequency", sparsity=0.25, skipping=pruner_skips)
    model = pruner.prune_model(tiny_model("mixtral"), pruner_tokenizer())
    if pruner_skips:
        disable_skipping(model)
    else:
        enable_skipping(model, calibrate_skipping(model, sample_input_ids(4, 16)))
    pruner.save(model, tmp_path / "switched")
    saved = _saved_records(tmp_path / "switched")
    expected = not pruner_skips
    assert saved["config"]["diep_skipping"]["enabled"] is expected
    assert saved["settings"]["skipping"] is expected
    assert saved["report"]["config"]["skipping"] is expected
    assert pruner.skipping is pruner_skips  # the pruner's own settings are left as they were
