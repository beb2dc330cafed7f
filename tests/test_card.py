"""Model cards: typed data -> jinja2 template -> ModelCard; parsed back with huggingface_hub; golden files."""

from __future__ import annotations

import os
from pathlib import Path

import jinja2
import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData, parse_eval_result_entries

import diep_hub
from diep_hub.card import HUB_BENCHMARKS, build_model_card, card_files, card_inputs, load_template, write_card
from diep_hub.families import get_family
from tests.helpers import hub_server as fake_hub
from tests.helpers.tiny_models import FAMILIES, tiny_model

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("DIEP_UPDATE_GOLDEN") == "1"
PNG = b"\x89PNG\r\n\x1a\n"
FORWARD_METHOD = "bytes live in malloc, read after every aten op of the forward, above those live before it"

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
    """The in-process fake Hub of tests/helpers/hub_server.py, with huggingface_hub pointed at it."""
    yield from fake_hub.serve(tmp_path, monkeypatch)



def _results(acc_base: float, acc_pruned: float, boolq_p: float) -> dict:
    def side(acc, boolq, speed, params, ppl):
        return {
            "lm_eval": {"tasks": {
                # dataset fields as lm-eval 0.4.13's task objects give them (test_evaluation.py checks that)
                "openbookqa": {"metrics": {"acc": acc, "acc_stderr": 0.02, "acc_norm": acc + 0.01},
                               "filter": "none", "primary_metric": "acc", "version": 1.0, "num_fewshot": 0,
                               "num_samples": 500, "dataset_path": "allenai/openbookqa", "dataset_name": "main",
                               "split": "test", "dataset_revision": None, "requested": True},
                "boolq": {"metrics": {"acc": boolq, "acc_stderr": 0.01}, "filter": "none", "primary_metric": "acc",
                          "version": 2.0, "num_fewshot": 0, "num_samples": 3270, "dataset_path": "aps/super_glue",
                          "dataset_name": "boolq", "split": "validation", "dataset_revision": None,
                          "requested": True},
            }, "lm_eval_version": "0.4.13", "date": "2026-01-15T10:30:00Z", "limit": None, "batch_size": 8,
                "num_fewshot": 0},
            "perplexity": {"perplexity": ppl, "mean_nll": 2.0, "tokens": 8192, "source": "wikitext"},
            "speed": {"prefill_tokens_per_s": speed * 10, "decode_tokens_per_s": speed},
            "memory": {"parameter_bytes": params, "routed_expert_bytes": params // 2,
                       "forward_peak_bytes": params // 50, "peak_bytes": None, "peak_method": FORWARD_METHOD,
                       "batch_size": 1, "seq_len": 128, "device": "cpu"},
            "environment": {"versions": {"lm_eval": "0.4.13"}},
        }

    base = side(acc_base, 0.85, 20.0, 93_000_000_000, 8.0)
    pruned = side(acc_pruned, boolq_p, 26.0, 49_000_000_000, 10.0)
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
    # the datasets lm-eval named; neither is a Hub benchmark, so no .eval_results entry (model-index only)
    datasets = {r.dataset_name: (r.dataset_type, r.dataset_config, r.dataset_split) for r in loaded.data.eval_results}
    assert datasets == {"openbookqa": ("allenai/openbookqa", "main", "test"),
                        "boolq": ("aps/super_glue", "boolq", "validation")}
    assert card.eval_entries == {} and not (tmp_path / ".eval_results").exists()
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


# ------------------------------------------------------------------------------------------ the ModelCard subclass
def test_card_is_a_model_card_with_its_template_and_front_matter():
    from diep_hub.card import DiepModelCard, load_template

    model, keep = _pruned("mixtral")
    card = build_model_card(model, base_model="mistralai/Mixtral-8x7B-v0.1", license="apache-2.0",
                            eval_results=_results(0.40, 0.38, 0.80), report=REPORT, repo_id="tester/mx-50")
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

    model, _ = _pruned("qwen2_moe")
    card = build_model_card(model, base_model="Qwen/Qwen1.5-MoE-A2.7B", license="apache-2.0", report=REPORT,
                            eval_results=_results(0.5, 0.45, 0.7), recipe_text=RECIPE, repo_id="tester/q-50")
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

    model, _ = _pruned("mixtral")
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

    model, _ = _pruned("mixtral")
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


# -------------------------------------------------------------------- issue 14: what was measured, with its error
def _evaluation_section(text: str) -> str:
    return text[text.index("## Evaluation"):text.index("## How to load")]


def _table(section: str, header: str) -> list[list[str]]:
    lines = section[section.index(header):].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:] if line.startswith("|")]


def test_retention_is_shown_with_its_error_and_items_beside_perplexity():
    import math
    import re

    evaluation = _results(0.40, 0.38, 0.80)
    card = build_model_card(tiny_model("mixtral"), eval_results=evaluation, license="mit")
    section = _evaluation_section(str(card))
    assert "**" not in section  # no bold single-number headline
    rows = {r[0]: r for r in _table(section, "| Task | Dataset (config, split) | Metric | Base | Pruned |")}
    expected = {"openbookqa": (0.40, 0.38, 0.02, 0.02, 500), "boolq": (0.85, 0.80, 0.01, 0.01, 3270)}
    errors = []
    for task, (base, pruned, se_b, se_p, items) in expected.items():
        _, _, metric, b, p, se, retention, n = rows[task]
        r = pruned / base
        r_se = r * math.sqrt((se_p / pruned) ** 2 + (se_b / base) ** 2)
        errors.append(r_se)
        assert (metric, float(b), float(p), int(n)) == ("acc (0-shot)", base, pruned, items)
        assert se == f"{se_b:.4f} / {se_p:.4f}"
        assert retention == f"{100 * r:.2f}% ± {100 * r_se:.2f}%"
    mean = evaluation["comparison"]["average_retention"]
    mean_se = math.sqrt(sum(e * e for e in errors)) / 2
    summary = re.search(r"Mean retention over (\d+) tasks \((\d+) items\): ([\d.]+)% ± ([\d.]+)% \(one standard "
                        r"error\); perplexity ([\d.]+) \(base\) -> ([\d.]+) \(pruned\), ([\d.]+)x\.", section)
    assert summary is not None, section
    assert summary.groups() == ("2", "3770", f"{100 * mean:.2f}", f"{100 * mean_se:.2f}", "8.000", "10.000", "1.25")
    assert card.inputs.retention.stderr == pytest.approx(mean_se)
    assert _table(section, "| Perplexity |")[0] == ["wikitext", "8.000", "10.000", "1.250", "8192"]


def test_missing_standard_errors_are_stated_not_invented():
    evaluation = _results(0.40, 0.38, 0.80)
    evaluation["base"]["lm_eval"]["tasks"]["boolq"]["metrics"]["acc_stderr"] = "N/A"  # what lm-eval writes
    card = build_model_card(tiny_model("mixtral"), eval_results=evaluation, license="mit")
    section = _evaluation_section(str(card))
    boolq = {r[0]: r for r in _table(section, "| Task | Dataset (config, split) |")}["boolq"]
    assert boolq[5:7] == ["n/a / 0.0100", f"{100 * 0.80 / 0.85:.2f}%"]
    assert "(standard error not recorded)" in section
    assert card.inputs.retention.stderr is None and card.inputs.results[1].retention_stderr is None


# ------------------------------------------------------------------------------ issue 14: figures people can read
def _png_size_and_dpi(png: bytes) -> tuple[int, int, float]:
    import struct

    assert png.startswith(PNG)
    width, height = struct.unpack(">II", png[16:24])
    at = png.index(b"pHYs")
    per_metre_x, _, unit = struct.unpack(">IIB", png[at + 4:at + 13])
    assert unit == 1  # metres
    return width, height, per_metre_x * 0.0254


def test_figures_render_at_twice_the_old_resolution():
    from diep_hub.card.figures import DPI, experts_per_layer_figure, png_bytes

    rows = [{"layer": i, "kept": len(v), "original": 8} for i, v in KEEP.items()]
    png = png_bytes(experts_per_layer_figure(rows, top_k=2))
    width, height, dpi = _png_size_and_dpi(png)
    assert DPI == 220 and round(dpi) == 220
    figure = experts_per_layer_figure(rows, top_k=2)
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    old_width, old_height, _ = _png_size_and_dpi(buffer.getvalue())
    assert width == pytest.approx(2 * old_width, rel=0.01) and height == pytest.approx(2 * old_height, rel=0.01)
    assert width >= 860  # 430 px wide before


def test_experts_legend_sits_outside_the_axes_and_floor_layers_stand_out():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_hex

    from diep_hub.card.figures import FLOOR_COLOR, KEPT_COLOR, experts_per_layer_figure

    rows = [{"layer": 0, "kept": 4, "original": 8}, {"layer": 1, "kept": 2, "original": 8},
            {"layer": 2, "kept": 8, "original": 8}, {"layer": 3, "kept": 2, "original": 8}]
    figure = experts_per_layer_figure(rows, top_k=2)
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    [ax] = figure.axes
    legend, box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= box.x1, (legend, box)  # entirely to the right of the plotting area: hides no bar
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "original", "kept", "kept, at floor (= top-k)", "top-k = 2"]
    kept_bars = ax.patches[len(rows):2 * len(rows)]
    assert [to_hex(p.get_facecolor()) for p in kept_bars] == [KEPT_COLOR, FLOOR_COLOR, KEPT_COLOR, FLOOR_COLOR]
    assert [p.get_height() for p in kept_bars] == [4, 2, 8, 2]


def test_heatmap_outlines_of_neighbouring_kept_experts_do_not_merge():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.patches import Rectangle

    from diep_hub.card.figures import DPI, scores_heatmap_figure

    scores = {str(i): [float(e) for e in range(8)] for i in range(3)}
    kept = {"0": [0, 1, 2], "1": [4, 5], "2": [7]}
    figure = scores_heatmap_figure(scores, kept)
    figure.set_dpi(DPI)
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    ax = figure.axes[0]
    outlines = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(outlines) == 6
    by_cell = {}
    for patch in outlines:
        col, row = round(patch.get_x() + patch.get_width() / 2), round(patch.get_y() + patch.get_height() / 2)
        assert col - 0.5 < patch.get_x() and patch.get_x() + patch.get_width() < col + 0.5  # inside its cell
        by_cell[(row, col)] = patch
    assert set(by_cell) == {(0, 0), (0, 1), (0, 2), (1, 4), (1, 5), (2, 7)}
    for left, right in [((0, 0), (0, 1)), ((0, 1), (0, 2)), ((1, 4), (1, 5))]:
        a, b = by_cell[left], by_cell[right]
        stroke = a.get_linewidth() * DPI / 72  # points -> pixels
        gap = b.get_window_extent(renderer).x0 - a.get_window_extent(renderer).x1
        assert gap > stroke, (left, right, gap, stroke)  # half a stroke each side still leaves a gap


def test_booleans_read_yes_or_no_and_floor_layers_are_pointed_out():
    import re

    model = diep_hub.prune_experts(tiny_model("mixtral"), {0: [0, 1, 2, 5], 1: [3, 6], 2: [0, 2, 3], 3: [1, 4]})
    model.config.diep_skipping = {"enabled": True, "kernel": "linear", "layers": {"0": {"gamma1": 0.5}}}
    report = {**REPORT, "skipping": {**REPORT["skipping"], "renormalize": False}}
    card = build_model_card(model, report=report, license="mit")
    text = str(card)
    assert "- enabled at load: yes" in text and "- renormalize: no" in text
    # code (fenced and inline) rightly says trust_remote_code=True / diep_skipping_enabled=False
    prose = re.sub(r"`[^`]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))
    assert "True" not in prose and "False" not in prose
    assert card.inputs.top_k == 2 and card.inputs.floor_layers == [1, 3]
    rows = _table(text, "| Layer | Kept | Original |")
    assert [(r[0], r[1], r[4]) for r in rows[:4]] == [("0", "4", "no"), ("1", "2", "yes"), ("2", "3", "no"),
                                                      ("3", "2", "yes")]
    assert "Layers at the floor (1, 3) keep only top-k = 2 experts" in text


@pytest.mark.parametrize("name", ["pruning_report.json", "evaluation.json"])
def test_damaged_folder_file_is_named_before_anything_is_written(name, tmp_path):
    from diep_hub.errors import CorruptFileError

    model, _ = _pruned("mixtral")
    folder = tmp_path / "ckpt"
    diep_hub.save_pruned(model, folder, extra_files={"pruning_report.json": REPORT})
    (folder / name).write_text('{"method": "diep",\n  "sparsity": }\n', encoding="utf-8")
    with pytest.raises(CorruptFileError, match=rf"{name} .*{name}.* is not valid JSON .*line 2, column 15"):
        write_card(folder, build_model_card(folder))
    assert not (folder / "README.md").exists() and not (folder / "assets").exists()


# ------------------------------------------------------------------------------------ issue 14: front matter
def test_other_license_carries_the_base_cards_name_and_link(hub):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    for repo, data in {
        "tester/llama-like": ModelCardData(license="other", license_name="llama3", license_link="LICENSE"),
        "tester/mit-base": ModelCardData(license="mit", license_name="stray", license_link="https://x.invalid"),
    }.items():
        api.create_repo(repo)
        base_card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n# b\n")
        api.upload_file(path_or_fileobj=str(base_card).encode(), path_in_repo="README.md", repo_id=repo)
    model, _ = _pruned("mixtral")
    other = ModelCard(str(build_model_card(model, base_model="tester/llama-like"))).data.to_dict()
    assert (other["license"], other["license_name"], other["license_link"]) == ("other", "llama3", "LICENSE")
    mit = ModelCard(str(build_model_card(model, base_model="tester/mit-base"))).data.to_dict()
    assert mit["license"] == "mit" and "license_name" not in mit and "license_link" not in mit


def test_front_matter_lists_the_calibration_dataset_when_it_is_on_the_hub(tmp_path):
    model, _ = _pruned("mixtral")
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
    rows = {r[0]: r for r in _table(loaded.text, "| Task | Dataset (config, split) |")}
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
    model, _ = _pruned("mixtral")
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
    evaluation = _results(0.4, 0.38, 0.8)
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


# ------------------------------------------------------------------------- issue 14: memory the model itself needs
def test_memory_rows_are_weights_and_the_isolated_forward_peak():
    evaluation = _results(0.40, 0.38, 0.80)
    section = _evaluation_section(str(build_model_card(tiny_model("mixtral"), eval_results=evaluation, license="mit")))
    ratio = f"{49 / 93:.3f}"  # every row scales with the parameters in this fixture
    assert _table(section, "| Memory |") == [
        ["Weights (all parameters)", "86.6 GiB", "45.6 GiB", ratio],
        ["Routed-expert weights", "43.3 GiB", "22.8 GiB", ratio],
        ["One forward: peak above the weights", "1.7 GiB", "934.6 MiB", ratio],
    ]
    assert f"from the rest of the process: {FORWARD_METHOD}; one forward over 1 x 128 tokens on cpu." in section
    assert "(RSS) is not reported" in section
    # results written before: peak_bytes was the process RSS; only the weights are shown from them
    for side in ("base", "pruned"):
        memory = evaluation[side]["memory"]
        for key in ("forward_peak_bytes", "peak_method", "batch_size", "seq_len", "device"):
            memory.pop(key)
        memory["peak_bytes"], memory["peak_method"] = 10**9, "process RSS, sampled"
    old = _evaluation_section(str(build_model_card(tiny_model("mixtral"), eval_results=evaluation, license="mit")))
    assert [r[0] for r in _table(old, "| Memory |")] == ["Weights (all parameters)", "Routed-expert weights"]
    assert "RSS, sampled" not in old and "isolates the model" not in old


# ------------------------------------------------------------------------------ issue 14: the card's own figures
def test_card_figures_are_2x_and_mark_the_floor_layers():
    from diep_hub.card.figures import DPI, experts_per_layer_png

    model = diep_hub.prune_experts(tiny_model("mixtral"), {0: [0, 1, 2, 5], 1: [3, 6], 2: [0, 2, 3], 3: [1, 4]})
    card = build_model_card(model, report=REPORT, license="mit")
    assert card.inputs.top_k == 2 and card.inputs.floor_layers == [1, 3]
    for path, png in card.figures.items():
        width, _, dpi = _png_size_and_dpi(png)
        assert round(dpi) == DPI and width >= 800, (path, width)  # sharp at ~400 CSS px; 110 dpi gave 430 px
    rows = [{"layer": r.layer, "kept": r.kept, "original": r.original} for r in card.inputs.layers]
    # the card's bar chart is the one drawn with top-k (floor colour, dashed top-k line), not the plain one
    assert card.figures["assets/experts_per_layer.png"] == experts_per_layer_png(rows, top_k=2)
    assert card.figures["assets/experts_per_layer.png"] != experts_per_layer_png(rows, top_k=None)


def _serving_section(text: str) -> str:
    assert "## Serving with vLLM" in text
    return text.split("## Serving with vLLM", 1)[1].split("\n## ", 1)[0]


def test_card_says_how_vllm_serves_the_checkpoint(tmp_path):
    """A diep_<family> the plugin serves: its two commands; a family it refuses: the reason; a stock export: plain
    `vllm serve` (issue 13, point 6). The wording comes from the same table `diep-hub inspect` reports."""
    from diep_hub.checkpoint.inspect import serving_support

    mixtral, _ = _pruned("mixtral")
    section = _serving_section(str(build_model_card(mixtral, repo_id="tester/mixtral-x")))
    assert 'pip install "./integrations/vllm[cuda]"' in section
    assert "vllm serve tester/mixtral-x --trust-remote-code" in section

    deepseek, _ = _pruned("deepseek_v3")
    section = _serving_section(str(build_model_card(deepseek, repo_id="tester/deepseek-x")))
    assert "Not servable by vLLM yet" in section and "vllm serve" not in section
    assert serving_support({"model_type": "diep_deepseek_v3"})["reason"] in section

    model = tiny_model("mixtral")
    layers = model.config.num_hidden_layers
    uniform = diep_hub.prune_experts(model, keep={layer: [0, 2, 3] for layer in range(layers)})
    folder = tmp_path / "stock"
    diep_hub.save_pruned(uniform, folder, stock_format=True)
    section = _serving_section(str(build_model_card(folder, repo_id="tester/stock-x")))
    assert "vllm serve tester/stock-x\n" in section and "trust-remote-code" not in section
