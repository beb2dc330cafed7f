"""Model cards: typed data -> jinja2 template -> ModelCard, for every family, parsed back with huggingface_hub and
compared with golden files; what reaches the card from the report, the evaluation, the recipe and the folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import jinja2
import pytest
from huggingface_hub import ModelCard, ModelCardData

import diep_hub
from diep_hub.card import build_model_card, card_files, card_inputs, load_template, write_card
from diep_hub.families import get_family
from tests.helpers.card_inputs import (
    PNG,
    RECIPE,
    REPORT,
    pruned_with_keep,
    results,
)
from tests.helpers.tiny_models import FAMILIES, tiny_model

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("DIEP_UPDATE_GOLDEN") == "1"


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE or not path.exists():
        path.write_text(text, encoding="utf-8")
        if not UPDATE:
            pytest.fail(f"golden file {name} was missing and has been written; review it and re-run")
    assert text == path.read_text(encoding="utf-8"), f"card differs from golden {name} (DIEP_UPDATE_GOLDEN=1 rewrites)"


def test_golden_card_with_results():
    model, _ = pruned_with_keep("mixtral")
    card = build_model_card(model, base_model="mistralai/Mixtral-8x7B-v0.1", license="apache-2.0",
                            eval_results=results(0.40, 0.38, 0.80), report=REPORT, recipe_text=RECIPE,
                            repo_id="tester/Mixtral-8x7B-DiEP-50", tags=["mixtral"])
    _check_golden("card_mixtral_results.md", str(card))


def test_golden_card_without_results(tmp_path):
    model, _ = pruned_with_keep("olmoe")
    folder = tmp_path / "ckpt"
    diep_hub.save_pruned(model, folder)
    card = build_model_card(folder, base_model="allenai/OLMoE-1B-7B-0924", license="apache-2.0")
    text = str(card)
    assert "No evaluation results" in text and "model-index" not in text
    assert "| Method | not recorded |" in text
    _check_golden("card_olmoe_no_results.md", text)


@pytest.mark.parametrize("family", FAMILIES)
def test_card_for_every_family_parses_back(family, tmp_path):
    model, keep = pruned_with_keep(family)
    evaluation = results(0.40, 0.36, 0.81)
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
    # the datasets lm-eval named; neither is a Hub benchmark, so no .eval_results entry (model-index only)
    datasets = {r.dataset_name: (r.dataset_type, r.dataset_config, r.dataset_split) for r in loaded.data.eval_results}
    assert datasets == {"openbookqa": ("allenai/openbookqa", "main", "test"),
                        "boolq": ("aps/super_glue", "boolq", "validation")}
    assert card.eval_entries == {} and not (tmp_path / ".eval_results").exists()
    assert (tmp_path / "assets" / "experts_per_layer.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("family", FAMILIES)
def test_card_for_every_family_without_results(family, tmp_path):
    model, _ = pruned_with_keep(family)
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
    model, keep = pruned_with_keep("qwen2_moe")
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


def test_a_ranking_with_pipes_stays_one_table_cell():
    """REAP's and validated_choice's rankings contain ``||x||_2``: unescaped, the pipes would split the table row."""
    model, _ = pruned_with_keep("mixtral")
    ranking = "reap (mean gate_weight * ||expert output||_2 over routed tokens), lowest held-out KL of ['reap']"
    text = str(build_model_card(model, report={**REPORT, "method": "validated_choice", "ranking": ranking}))
    (row,) = [line for line in text.splitlines() if line.startswith("| Ranking |")]
    cells = re.split(r"(?<!\\)\|", row.strip().strip("|"))
    assert [c.strip() for c in cells] == ["Ranking", ranking.replace("|", "\\|")]
    assert "| Method | validated_choice |" in text


def test_folder_card_reads_report_evaluation_and_recipe(tmp_path):
    model, _ = pruned_with_keep("mixtral")
    folder = tmp_path / "ckpt"
    evaluation = results(0.5, 0.45, 0.7)
    diep_hub.save_pruned(model, folder, extra_files={"pruning_report.json": REPORT, "evaluation.json": evaluation,
                                                     "recipe.yaml": RECIPE})
    inputs = card_inputs(folder, license="apache-2.0")
    assert inputs.method == "diep" and inputs.seed == 7 and inputs.recipe_text == RECIPE
    assert [(r.task, r.base, r.pruned) for r in inputs.results] == [("openbookqa", 0.5, 0.45), ("boolq", 0.85, 0.7)]
    assert inputs.results[0].retention == pytest.approx(0.9)
    assert inputs.average_retention == evaluation["comparison"]["average_retention"]


def test_license_is_inherited_from_the_base_model(hub_server, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    api.create_repo("tester/base-moe")
    base_card = ModelCard.from_template(ModelCardData(license="mit"), template_str="---\n{{ card_data }}\n---\n# b\n")
    api.upload_file(path_or_fileobj=str(base_card).encode(), path_in_repo="README.md", repo_id="tester/base-moe")
    model, _ = pruned_with_keep("mixtral")
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
    evaluation = results(0.40, 0.36, 0.81)
    for side in ("base", "pruned"):
        evaluation[side]["lm_eval"]["tasks"]["mmlu_anatomy"] = {
            "metrics": {"acc": 0.3}, "primary_metric": "acc", "requested": False, "group": False}
    card = build_model_card(tiny_model("mixtral"), eval_results=evaluation, license="mit")
    assert [r.task for r in card.inputs.results] == ["openbookqa", "boolq"]
    assert "mmlu_anatomy" not in str(card)


def test_unknown_license_is_stated_not_invented():
    model, _ = pruned_with_keep("mixtral")
    card = build_model_card(model, report=REPORT)
    assert card.data.license is None
    assert "| License | not recorded: the base model's license applies; check it before use |" in str(card)


def test_card_layers_and_inspect_read_experts_the_same_way():
    """The card's layer table is inspect's experts_table with defaults: config fields first, else the report."""
    from diep_hub.card.inputs import layer_rows as _layer_rows
    from diep_hub.checkpoint.report import experts_table

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


@pytest.mark.parametrize("name", ["pruning_report.json", "evaluation.json"])
def test_damaged_folder_file_is_named_before_anything_is_written(name, tmp_path):
    from diep_hub.errors import CorruptFileError

    model, _ = pruned_with_keep("mixtral")
    folder = tmp_path / "ckpt"
    diep_hub.save_pruned(model, folder, extra_files={"pruning_report.json": REPORT})
    (folder / name).write_text('{"method": "diep",\n  "sparsity": }\n', encoding="utf-8")
    with pytest.raises(CorruptFileError, match=rf"{name} .*{name}.* is not valid JSON .*line 2, column 15"):
        write_card(folder, build_model_card(folder))
    assert not (folder / "README.md").exists() and not (folder / "assets").exists()
