"""The card as a huggingface_hub ModelCard: its subclass and template, loading back, front matter (license, datasets),
the model-index and .eval_results entries, and the title naming the base model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData, parse_eval_result_entries

import diep_hub
from diep_hub.card import HUB_BENCHMARKS, build_model_card, card_files, load_template, write_card
from tests.helpers.card_inputs import (
    RECIPE,
    REPORT,
    pruned_with_keep,
    results,
    table,
)
from tests.helpers.tiny_models import tiny_model


# ------------------------------------------------------------------------------------------ the ModelCard subclass
def test_card_is_a_model_card_with_its_template_and_front_matter():
    from diep_hub.card import DiepModelCard

    model, keep = pruned_with_keep("mixtral")
    card = build_model_card(model, base_model="mistralai/Mixtral-8x7B-v0.1", license="apache-2.0",
                            eval_results=results(0.40, 0.38, 0.80), report=REPORT, repo_id="tester/mx-50")
    assert isinstance(card, DiepModelCard) and isinstance(card, ModelCard)
    assert Path(DiepModelCard.default_template_path).read_text(encoding="utf-8") == load_template()
    front = card.data.to_dict()
    assert front["base_model"] == "mistralai/Mixtral-8x7B-v0.1" and front["license"] == "apache-2.0"
    assert front["experts_per_layer"] == {str(k): len(v) for k, v in keep.items()}
    [index] = front["model-index"]
    assert index["name"] == "mx-50"
    got = {(r["dataset"]["name"], r["metrics"][0]["type"]): r["metrics"][0]["value"] for r in index["results"]}
    assert got == {("openbookqa", "acc"): 0.38, ("boolq", "acc"): 0.80}
    # from_template with no template named renders the shipped one, every variable at its fallback
    bare = DiepModelCard.from_template(ModelCardData(license="mit"))
    assert isinstance(bare, DiepModelCard) and bare.data.license == "mit"
    assert "No evaluation results" in bare.text and "No recipe was recorded" in bare.text


def test_saved_card_loads_back_as_the_same_card(tmp_path):
    from diep_hub.card import DiepModelCard

    model, _ = pruned_with_keep("qwen2_moe")
    card = build_model_card(model, base_model="Qwen/Qwen1.5-MoE-A2.7B", license="apache-2.0", report=REPORT,
                            eval_results=results(0.5, 0.45, 0.7), recipe_text=RECIPE, repo_id="tester/q-50")
    card.save(tmp_path / "README.md")
    loaded = DiepModelCard.load(tmp_path / "README.md")
    assert type(loaded) is DiepModelCard
    assert loaded.data.to_dict() == card.data.to_dict()
    assert loaded.text == card.text and str(loaded) == str(card)
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in loaded.data.eval_results] == [
        ("openbookqa", "acc", 0.45), ("boolq", "acc", 0.7)]
    # a loaded card knows its text, not what it was built from: no figures or benchmark files to write
    assert loaded.inputs is None and loaded.figures == {} and loaded.eval_entries == {}
    assert set(card_files(loaded)) == {"README.md"}


def test_figures_are_drawn_only_when_asked_for(tmp_path):
    """Building and printing a card (``diep-hub card --stdout``) never imports matplotlib; writing it does."""
    import subprocess
    import sys

    model, _ = pruned_with_keep("mixtral")
    folder = tmp_path / "ckpt"
    diep_hub.save_pruned(model, folder, extra_files={"pruning_report.json": REPORT})
    script = (
        "import sys; from diep_hub.card import build_model_card\n"
        f"card = build_model_card({str(folder)!r}); text = str(card)\n"
        "print('matplotlib' in sys.modules, len(text) > 0)\n"
        "print(sorted(card.figures), 'matplotlib' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "False True", "['assets/expert_scores.png', 'assets/experts_per_layer.png'] True"]


def test_card_inputs_come_from_the_report_in_one_place():
    """A PruningReport or its JSON form give the same card data; the config's diep_pruning record fills only
    what the report lacks."""
    from diep_hub.card import card_inputs_from_report
    from diep_hub.checkpoint.report import PruningReport

    model, _ = pruned_with_keep("mixtral")
    config = model.config.to_dict()
    config["diep_pruning"] = {"method": "frequency", "sparsity": 0.25, "seed": 3, "selection": "uniform"}
    from_dict = card_inputs_from_report(REPORT, None, config=config)
    from_typed = card_inputs_from_report(PruningReport.from_dict(REPORT), None, config=config)
    assert from_dict == from_typed
    assert (from_dict.method, from_dict.sparsity, from_dict.seed, from_dict.selection) == ("diep", 0.5, 7, "global")
    assert from_dict.calibration == {"dataset": "allenai/c4", "num_samples": 128, "seq_len": 2048}
    assert from_dict.scores == {i: [float((i * 3 + e) % 8) for e in range(8)] for i in range(4)}
    no_report = card_inputs_from_report(None, None, config=config)
    assert (no_report.method, no_report.sparsity, no_report.seed, no_report.selection) == (
        "frequency", 0.25, 3, "uniform")
    assert no_report.scores is None and "scores" not in no_report.figures


# ------------------------------------------------------------------------------------ issue 14: front matter
def test_other_license_carries_the_base_cards_name_and_link(hub_server):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    for repo, data in {
        "tester/llama-like": ModelCardData(license="other", license_name="llama3", license_link="LICENSE"),
        "tester/mit-base": ModelCardData(license="mit", license_name="stray", license_link="https://x.invalid"),
    }.items():
        api.create_repo(repo)
        base_card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n# b\n")
        api.upload_file(path_or_fileobj=str(base_card).encode(), path_in_repo="README.md", repo_id=repo)
    model, _ = pruned_with_keep("mixtral")
    other = ModelCard(str(build_model_card(model, base_model="tester/llama-like"))).data.to_dict()
    assert (other["license"], other["license_name"], other["license_link"]) == ("other", "llama3", "LICENSE")
    mit = ModelCard(str(build_model_card(model, base_model="tester/mit-base"))).data.to_dict()
    assert mit["license"] == "mit" and "license_name" not in mit and "license_link" not in mit


def test_front_matter_lists_the_calibration_dataset_when_it_is_on_the_hub(tmp_path):
    model, _ = pruned_with_keep("mixtral")
    card = ModelCard(str(build_model_card(model, report=REPORT, license="mit")))
    assert card.data.datasets == ["allenai/c4"]
    local = tmp_path / "corpus.txt"
    local.write_text("some text\n")
    report = {**REPORT, "calibration": {"dataset": str(local), "num_samples": 4, "seq_len": 8}}
    card = ModelCard(str(build_model_card(model, report=report, license="mit")))
    assert card.data.datasets is None and "datasets" not in card.data.to_dict()


# -------------------------------------------------------------- issue 14: datasets and metrics as lm-eval names them
def _gpqa_and_gsm8k() -> dict:
    """A gsm8k row as lm-eval 0.4.13 reports it (filtered metric), a gpqa_diamond row (a Hub benchmark), and a
    gsm8k row written by an older diep_hub (``exact_match,strict-match`` as the metric name)."""
    revision = "a" * 40
    tasks = {
        "gsm8k": {"metrics": {"exact_match": 0.3, "exact_match_stderr": 0.012}, "filter": "strict-match",
                  "metrics_by_filter": {"strict-match": {"exact_match": 0.3}, "flexible-extract": {"exact_match": 0.4}},
                  "primary_metric": "exact_match", "num_fewshot": 5, "num_samples": 1319,
                  "dataset_path": "openai/gsm8k", "dataset_name": "main", "split": "test",
                  "dataset_revision": "b" * 40, "requested": True},
        "gpqa_diamond_zeroshot": {"metrics": {"acc": 0.31, "acc_stderr": 0.03}, "filter": "none",
                                  "primary_metric": "acc", "num_fewshot": 0, "num_samples": 198,
                                  "dataset_path": "Idavidrein/gpqa", "dataset_name": "gpqa_diamond", "split": "train",
                                  "dataset_revision": revision, "requested": True},
        "gsm8k_old": {"metrics": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.01},
                      "primary_metric": "exact_match,strict-match", "num_fewshot": 5, "requested": True},
    }
    return {"lm_eval": {"tasks": tasks, "lm_eval_version": "0.4.13", "date": "2026-01-15T10:30:00Z",
                        "batch_size": 8, "limit": None, "num_fewshot": 0}}


def test_model_index_takes_dataset_ids_from_lm_eval_and_metrics_without_filters(tmp_path):
    card = build_model_card(tiny_model("mixtral"), eval_results=_gpqa_and_gsm8k(), license="mit",
                            repo_id="tester/mx-50")
    write_card(tmp_path, card)
    loaded = ModelCard.load(tmp_path / "README.md")
    got = {r.dataset_name: (r.dataset_type, r.dataset_config, r.dataset_split, r.dataset_revision, r.metric_type,
                            r.metric_config, r.metric_name, r.metric_value) for r in loaded.data.eval_results}
    assert got == {
        "gsm8k": ("openai/gsm8k", "main", "test", "b" * 40, "exact_match", "strict-match",
                  "exact_match (5-shot, strict-match)", 0.3),
        "gpqa_diamond_zeroshot": ("Idavidrein/gpqa", "gpqa_diamond", "train", "a" * 40, "acc", None, "acc (0-shot)",
                                  0.31),
        # no dataset recorded: the task name stands in, as before; the legacy name is split all the same
        "gsm8k_old": ("gsm8k_old", None, None, None, "exact_match", "strict-match",
                      "exact_match (5-shot, strict-match)", 0.25),
    }
    assert not any("," in r.metric_type for r in loaded.data.eval_results)
    rows = {r[0]: r for r in table(loaded.text, "| Task | Dataset (config, split) |")}
    assert rows["gsm8k"][1:3] == ["openai/gsm8k (main, test)", "exact_match (5-shot, filter strict-match)"]
    assert rows["gsm8k_old"][1:3] == ["n/a", "exact_match (5-shot, filter strict-match)"]


def test_eval_results_only_for_hub_benchmarks_with_date_source_and_revision(tmp_path):
    card = build_model_card(tiny_model("mixtral"), eval_results=_gpqa_and_gsm8k(), license="mit",
                            repo_id="tester/mx-50")
    write_card(tmp_path, card)
    assert sorted(p.name for p in (tmp_path / ".eval_results").iterdir()) == ["gpqa_diamond_zeroshot.yaml"]
    [entry] = parse_eval_result_entries(
        yaml.safe_load((tmp_path / ".eval_results" / "gpqa_diamond_zeroshot.yaml").read_text()))
    assert (entry.dataset_id, entry.task_id) == ("Idavidrein/gpqa", HUB_BENCHMARKS[("Idavidrein/gpqa", "gpqa_diamond")])
    assert (entry.value, entry.dataset_revision, entry.date) == (0.31, "a" * 40, "2026-01-15T10:30:00Z")
    assert (entry.source_url, entry.source_name) == ("https://huggingface.co/tester/mx-50",
                                                     "diep_hub evaluation (lm-eval 0.4.13)")
    assert entry.notes == "lm-eval 0.4.13 task gpqa_diamond_zeroshot: acc, 0-shot, after DiEP expert pruning"
    # a caller may name a benchmark the table does not know, by task
    extra = build_model_card(tiny_model("mixtral"), eval_results=_gpqa_and_gsm8k(), license="mit",
                             benchmarks={"gsm8k": ("openai/gsm8k", "gsm8k")})
    assert sorted(extra.eval_entries) == ["gpqa_diamond_zeroshot", "gsm8k"]
    [gsm] = extra.eval_entries["gsm8k"]
    assert (gsm.dataset_revision, gsm.source_url, gsm.source_name) == ("b" * 40, None, None)  # no repo: no source


# ---------------------------------------------------------------------------- issue 14: the title names the base
@pytest.mark.parametrize("kind", ["hub id", "local folder", "hub cache folder", "report only"])
def test_title_names_the_base_model(kind, tmp_path):
    model, _ = pruned_with_keep("mixtral")
    folder = tmp_path / "models" / "Mixtral-8x7B-v0.1"
    cache = tmp_path / "hub" / "models--mistralai--Mixtral-8x7B-v0.1" / "snapshots" / ("c" * 40)
    for path in (folder, cache):
        path.mkdir(parents=True)
    base, report = {
        "hub id": ("mistralai/Mixtral-8x7B-v0.1", REPORT),
        "local folder": (str(folder) + "/", REPORT),
        "hub cache folder": (str(cache), REPORT),
        "report only": (None, {**REPORT, "base_model": "mistralai/Mixtral-8x7B-v0.1"}),
    }[kind]
    evaluation = results(0.4, 0.38, 0.8)
    card = build_model_card(model, base_model=base, report=report, license="mit", eval_results=evaluation)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    title = next(line for line in loaded.text.splitlines() if line.startswith("# "))
    assert title == "# Mixtral-8x7B-v0.1-DiEP-50"
    [index] = loaded.data.to_dict()["model-index"]
    assert index["name"] == "Mixtral-8x7B-v0.1-DiEP-50"
    if kind == "local folder":  # a path is no Hub id: named, not linked, not in the front matter
        assert loaded.data.base_model is None
        assert "This is `Mixtral-8x7B-v0.1` (a local copy, not a Hub id)" in loaded.text
        assert str(tmp_path) not in str(loaded)
    else:
        assert loaded.data.base_model == "mistralai/Mixtral-8x7B-v0.1"
        assert "[mistralai/Mixtral-8x7B-v0.1](https://huggingface.co/mistralai/Mixtral-8x7B-v0.1)" in loaded.text
    # a repo name is the model-index name; the title still names the base
    named = ModelCard(str(build_model_card(model, base_model=base, report=report, license="mit",
                                           eval_results=evaluation, repo_id="me/mx-half")))
    assert named.text.splitlines()[1] == "# Mixtral-8x7B-v0.1-DiEP-50"
    assert named.data.to_dict()["model-index"][0]["name"] == "mx-half"


def test_title_without_any_base_names_the_family_not_model():
    card = build_model_card(tiny_model("mixtral"), report={"method": "diep", "sparsity": 0.5}, license="mit")
    assert card.text.splitlines()[1] == "# mixtral-DiEP-50"
