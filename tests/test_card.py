"""Model cards: typed data -> jinja2 template -> ModelCard; parsed back with huggingface_hub; golden files."""

from __future__ import annotations

import os
from pathlib import Path

import hub_server as fake_hub
import jinja2
import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData, parse_eval_result_entries
from tiny_models import FAMILIES, tiny_model

import diep_hub
from diep_hub.card import HUB_BENCHMARKS, build_model_card, card_files, card_inputs, load_template, write_card
from diep_hub.families import get_family

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("DIEP_UPDATE_GOLDEN") == "1"
PNG = b"\x89PNG\r\n\x1a\n"

REPORT = {
    "method": "diep",
    "sparsity": 0.5,
    "selection": "global",
    "ranking": "softmax",
    "seed": 7,
    "num_removed": 16,
    "num_total": 32,
    "calibration": {"dataset": "allenai/c4", "num_samples": 128, "seq_len": 2048},
    "wall_seconds": 12.5,
    "scores": {str(i): [float((i * 3 + e) % 8) for e in range(8)] for i in range(4)},
    "versions": {"python": "3.11.7", "diep_hub": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0"},
    "alpha": {"0": [0.1] * 8},
    # the shape of SkippingCalibration.summary() plus the rates the runner measures during evaluation
    "skipping": {
        "kernel": "linear",
        "calibration_tokens": 4096,
        "cka_tokens": 512,
        "measured_on": "the pruned model's evaluation",
        "layers": {
            "0": {"gamma1": 0.4375, "mean_pairwise_cka": 0.3125, "calibration_skip_rate": 0.5,
                  "measured_skip_rate": 0.125, "measured_slots": 800},
            "1": {"gamma1": 0.25, "mean_pairwise_cka": 0.5, "calibration_skip_rate": 0.375},
        },
    },
}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The in-process fake Hub of tests/hub_server.py, with huggingface_hub pointed at it."""
    yield from fake_hub.serve(tmp_path, monkeypatch)



def _results(acc_base: float, acc_pruned: float, boolq_p: float) -> dict:
    def side(acc, boolq, speed, params):
        return {
            "lm_eval": {"tasks": {
                "openbookqa": {"metrics": {"acc": acc, "acc_stderr": 0.02, "acc_norm": acc + 0.01},
                               "primary_metric": "acc", "version": 1.0, "num_fewshot": 0, "num_samples": 500,
                               "dataset_path": "allenai/openbookqa", "requested": True},
                "boolq": {"metrics": {"acc": boolq, "acc_stderr": 0.01}, "primary_metric": "acc", "version": 2.0,
                          "num_fewshot": 0, "num_samples": 3270, "dataset_path": "super_glue", "requested": True},
            }, "lm_eval_version": "0.4.13", "limit": None, "batch_size": 8, "num_fewshot": 0},
            "speed": {"prefill_tokens_per_s": speed * 10, "decode_tokens_per_s": speed},
            "memory": {"parameter_bytes": params, "routed_expert_bytes": params // 2, "peak_bytes": params * 2},
            "environment": {"versions": {"lm_eval": "0.4.13"}},
        }

    base = side(acc_base, 0.85, 20.0, 93_000_000_000)
    pruned = side(acc_pruned, boolq_p, 26.0, 49_000_000_000)
    average = (acc_pruned / acc_base + boolq_p / 0.85) / 2
    return {"base": base, "pruned": pruned, "comparison": {"average_retention": average}}


KEEP = {0: [0, 1, 2, 5], 1: [1, 3, 4, 6, 7], 2: [0, 2, 3], 3: [1, 2, 4, 5]}
RECIPE = "model:\n  id: mistralai/Mixtral-8x7B-v0.1\npruning:\n  method: diep\n  sparsity: 0.5\n  seed: 7\n"


def _pruned(family: str, seed: int = 0):
    model = tiny_model(family, seed=seed)
    layers = get_family(model).moe_layers(model)
    keep = {layer.index: KEEP[layer.index] for layer in layers}
    if family == "deepseek_v3":  # grouped routing: keep a multiple of n_group=2 per layer, one group each side
        keep = {layer.index: [0, 1, 4, 5] if layer.index % 2 else [0, 3, 4, 7] for layer in layers}
    return diep_hub.prune_experts(model, keep), keep


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE or not path.exists():
        path.write_text(text, encoding="utf-8")
        if not UPDATE:
            pytest.fail(f"golden file {name} was missing and has been written; review it and re-run")
    assert text == path.read_text(encoding="utf-8"), f"card differs from golden {name} (DIEP_UPDATE_GOLDEN=1 rewrites)"


def test_golden_card_with_results():
    model, _ = _pruned("mixtral")
    card = build_model_card(model, base_model="mistralai/Mixtral-8x7B-v0.1", license="apache-2.0",
                            eval_results=_results(0.40, 0.38, 0.80), report=REPORT, recipe_text=RECIPE,
                            repo_id="tester/Mixtral-8x7B-DiEP-50", tags=["mixtral"])
    _check_golden("card_mixtral_results.md", str(card))


def test_golden_card_without_results(tmp_path):
    model, _ = _pruned("olmoe")
    folder = tmp_path / "ckpt"
    diep_hub.save_pruned(model, folder)
    card = build_model_card(folder, base_model="allenai/OLMoE-1B-7B-0924", license="apache-2.0")
    text = str(card)
    assert "No evaluation results" in text and "model-index" not in text
    assert "| Method | not recorded |" in text
    _check_golden("card_olmoe_no_results.md", text)


@pytest.mark.parametrize("family", FAMILIES)
def test_card_for_every_family_parses_back(family, tmp_path):
    model, keep = _pruned(family)
    evaluation = _results(0.40, 0.36, 0.81)
    card = build_model_card(model, base_model=f"org/{family}-base", license="mit", eval_results=evaluation,
                            report={"method": "reap", "sparsity": 0.45, "seed": 1}, repo_id=f"tester/{family}-x")
    write_card(tmp_path, card)
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.base_model == f"org/{family}-base"
    assert loaded.data.license == "mit"
    assert loaded.data.pipeline_tag == "text-generation" and loaded.data.library_name == "transformers"
    assert {"diep", "moe", family} <= set(loaded.data.tags)
    expected_counts = {str(k): len(v) for k, v in keep.items()}
    assert loaded.data.to_dict()["experts_per_layer"] == expected_counts
    assert [r.kept for r in card.inputs.layers] == [len(v) for v in keep.values()]
    assert [r.kept_ids for r in card.inputs.layers] == [sorted(v) for v in keep.values()]
    for layer, ids in keep.items():
        assert f"| {layer} | {len(ids)} | 8 | {', '.join(map(str, sorted(ids)))} |" in loaded.text
    got = {(r.dataset_name, r.metric_type): r.metric_value for r in loaded.data.eval_results}
    assert got == {("openbookqa", "acc"): 0.36, ("boolq", "acc"): 0.81}
    assert loaded.data.model_name == f"{family}-x"
    renorm = get_family(model).renormalizes(model.config)
    assert ("Routing weights change" in loaded.text) == (not renorm)
    assert get_family(model).notes in loaded.text
    assert "trust_remote_code=True" in loaded.text and "import diep_hub" in loaded.text
    assert "cannot load" in loaded.text  # serving-engine limitation
    # Benchmarks the Hub tracks get .eval_results entries; others do not.
    entries = parse_eval_result_entries(yaml.safe_load((tmp_path / ".eval_results" / "openbookqa.yaml").read_text()))
    assert [(e.dataset_id, e.task_id, e.value) for e in entries] == [(*HUB_BENCHMARKS["openbookqa"], 0.36)]
    assert sorted(p.name for p in (tmp_path / ".eval_results").iterdir()) == ["boolq.yaml", "openbookqa.yaml"]
    assert (tmp_path / "assets" / "experts_per_layer.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("family", FAMILIES)
def test_card_for_every_family_without_results(family, tmp_path):
    model, _ = _pruned(family)
    card = build_model_card(model, license="other")
    loaded = ModelCard(str(card))
    assert loaded.data.eval_results is None
    assert "No evaluation results" in loaded.text
    assert "| Base | Pruned |" not in loaded.text
    assert card.eval_entries == {}
    assert list(card.figures) == ["assets/experts_per_layer.png"]  # no scores without a report


def test_template_has_a_fallback_for_every_variable():
    text = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(load_template()).render()
    assert "No evaluation results" in text
    assert "No recipe was recorded" in text and "not recorded" in text


def test_report_fields_reach_the_card_and_figures(tmp_path):
    model, keep = _pruned("qwen2_moe")
    card = build_model_card(model, report=REPORT, recipe_text=RECIPE, license="apache-2.0",
                            base_model="Qwen/Qwen1.5-MoE-A2.7B")
    text = str(card)
    assert "| Target sparsity | 50.0% of routed experts |" in text
    assert "| Experts removed | 16 of 32 |" in text
    assert "| Seed | 7 |" in text and "| Pruning time | 12.5 s |" in text
    assert "allenai/c4, 128 x 2048 tokens" in text
    assert "arXiv:2509.16105" in text
    assert "- kernel: linear" in text and "- calibration_tokens: 4096" in text  # skipping section
    assert "| 0 | 0.4375 | 0.3125 | 50.0% | 12.5% |" in text
    assert "| 1 | 0.2500 | 0.5000 | 37.5% | not measured |" in text
    assert "```yaml\n" + RECIPE.strip() + "\n```" in text and "diep-hub run recipe.yaml" in text
    assert "- transformers: 5.23.0" in text
    files = card_files(card)
    assert files["assets/expert_scores.png"].startswith(PNG)
    assert "![Expert scores per layer](assets/expert_scores.png)" in text


def test_folder_card_reads_report_evaluation_and_recipe(tmp_path):
    model, _ = _pruned("mixtral")
    folder = tmp_path / "ckpt"
    evaluation = _results(0.5, 0.45, 0.7)
    diep_hub.save_pruned(model, folder, extra_files={"pruning_report.json": REPORT, "evaluation.json": evaluation,
                                                     "recipe.yaml": RECIPE})
    inputs = card_inputs(folder, license="apache-2.0")
    assert inputs.method == "diep" and inputs.seed == 7 and inputs.recipe_text == RECIPE
    assert [(r.task, r.base, r.pruned) for r in inputs.results] == [("openbookqa", 0.5, 0.45), ("boolq", 0.85, 0.7)]
    assert inputs.results[0].retention == pytest.approx(0.9)
    assert inputs.average_retention == evaluation["comparison"]["average_retention"]


def test_license_is_inherited_from_the_base_model(hub, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo("tester/base-moe")
    base_card = ModelCard.from_template(ModelCardData(license="mit"), template_str="---\n{{ card_data }}\n---\n# b\n")
    api.upload_file(path_or_fileobj=str(base_card).encode(), path_in_repo="README.md", repo_id="tester/base-moe")
    model, _ = _pruned("mixtral")
    card = build_model_card(model, base_model="tester/base-moe")
    assert card.data.license == "mit"
    offline = build_model_card(model, base_model="tester/base-moe", license="apache-2.0")
    assert offline.data.license == "apache-2.0"  # an explicit license wins


def test_unknown_input_is_refused(tmp_path):
    from diep_hub.errors import ConfigError

    with pytest.raises(ConfigError, match="no readable config.json"):
        build_model_card(tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        build_model_card(tiny_model("mixtral"), eval_results={}, evaluation={})
    with pytest.raises(ConfigError, match="is not a folder"):
        write_card(tmp_path / "missing", ModelCard("---\n---\n"))


def test_only_requested_tasks_reach_the_card():
    evaluation = _results(0.40, 0.36, 0.81)
    for side in ("base", "pruned"):
        evaluation[side]["lm_eval"]["tasks"]["mmlu_anatomy"] = {
            "metrics": {"acc": 0.3}, "primary_metric": "acc", "requested": False, "group": False}
    card = build_model_card(tiny_model("mixtral"), eval_results=evaluation, license="mit")
    assert [r.task for r in card.inputs.results] == ["openbookqa", "boolq"]
    assert "mmlu_anatomy" not in str(card)


def test_unknown_license_is_stated_not_invented():
    model, _ = _pruned("mixtral")
    card = build_model_card(model, report=REPORT)
    assert card.data.license is None
    assert "| License | not recorded: the base model's license applies; check it before use |" in str(card)


def test_card_layers_and_inspect_read_experts_the_same_way():
    """The card's layer table is inspect's experts_table with defaults: config fields first, else the report."""
    from diep_hub.card import _layer_rows
    from diep_hub.inspection import experts_table

    config = {"num_experts_per_layer": [None, 2, 3], "original_num_experts": [None, 4],
              "kept_expert_ids": [None, [0, 3]]}
    assert experts_table(config) == [{"layer": 1, "kept": 2, "original": 4, "kept_ids": [0, 3]},
                                     {"layer": 2, "kept": 3, "original": None, "kept_ids": None}]
    assert [(r.layer, r.kept, r.original, r.kept_ids) for r in _layer_rows(config, {})] == [
        (1, 2, 4, [0, 3]), (2, 3, 3, [0, 1, 2])]
    # Stock format: no per-layer fields in config.json, the report's plan (original ids first, else kept ids).
    report = {"experts_before": {"0": 8}, "kept_original_ids": {"10": [1, 2], "0": [5, 6, 7]}}
    assert experts_table({}, report) == [{"layer": 0, "kept": 3, "original": 8, "kept_ids": [5, 6, 7]},
                                         {"layer": 10, "kept": 2, "original": None, "kept_ids": [1, 2]}]
    assert [(r.layer, r.kept, r.original, r.kept_ids) for r in _layer_rows({}, report)] == [
        (0, 3, 8, [5, 6, 7]), (10, 2, 2, [1, 2])]
    assert experts_table({}, {"kept_ids": {"1": [0]}}) == [{"layer": 1, "kept": 1, "original": None, "kept_ids": [0]}]
    assert experts_table({}, None) == [] and experts_table({}, {}) == []
