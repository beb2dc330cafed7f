"""PruningReport: pruning_report.json typed, read and written in one place; checkpoint file names defined once.

Round trip field by field; a report written before the typed class (its JSON written out literally below) loads,
keeps its layout and still `inspect`s, in the diep_<family> and the stock format; a damaged report is a
CorruptFileError naming the file; the file names appear as string literals only in diep_hub/checkpoint/layout.py.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

import diep_hub
from diep_hub.checkpoint.inspect import format_inspection, inspect_checkpoint
from diep_hub.checkpoint.layout import REPORT_FILE
from diep_hub.checkpoint.report import Calibration, PruningReport, experts_table
from diep_hub.checkpoint.report_fields import FIELDS
from diep_hub.errors import ConfigError, CorruptFileError
from diep_hub.jsonable import to_jsonable
from diep_hub.pruner import DiEPPruner
from tests.helpers.tiny_models import tiny_model
from tests.helpers.word_tokenizer import pruner_texts, pruner_tokenizer

PACKAGE = Path(diep_hub.__file__).parent


def _full_report() -> PruningReport:
    """Every field set (finite numbers, so that == compares them), plus a key this version does not know."""
    return PruningReport(
        pruner_config={"sparsity": 0.5, "method": "diep", "dataset": "allenai/c4", "num_samples": 8, "seq_len": 16},
        base_model="mistralai/Mixtral-8x7B-v0.1",
        family="mixtral",
        format="stock",
        method="diep",
        reference="https://arxiv.org/abs/2509.16105",
        ranking="softmax(alpha)*beta",
        seed=3,
        sparsity=0.5,
        selection="global",
        num_removed=3,
        num_total=8,
        rounding="K = round_half_up(0.5 x 8) = 4",
        selection_plan={"keep": {"0": [0, 2], "1": [1, 2, 3]}, "mode": "global"},
        experts_before={0: 4, 1: 4},
        kept_ids={0: [0, 2], 1: [1, 2, 3]},
        kept_original_ids={0: [0, 2], 1: [1, 2, 3]},
        per_layer_kept={0: 2, 1: 3},
        scores={0: [0.5, 0.125, 0.25, 0.0625], 1: [0.0, 1.0, 2.0, 3.0]},
        details={"mode": "gated", "alpha_optimizer_steps": 3},
        calibration=Calibration(dataset="diep-hub/tiny-text", num_samples=8, seq_len=16, loaded_from="/tmp/t.jsonl",
                                extra={"split": "train"}),
        calibration_shape=[8, 16],
        wall_seconds=1.5,
        scoring_seconds=0.75,
        peak_memory={"cpu_rss_peak_bytes": 1024, "method": "sampled"},
        versions={"python": "3.11.7", "torch": "2.13.0", "accelerate": None},
        previous_pruning={"method": "frequency", "sparsity": 0.25},
        alpha={0: [0.1, 0.2, 0.3, 0.4], 1: [1.0, 2.0, 3.0, 4.0]},
        beta={0: 0.5, 1: 2.0},
        loss_curve=[{"total": 2.0, "ce": 1.5, "recon": 0.5}],
        skipping={"kernel": "linear", "layers": {"0": {"gamma1": 0.4375}}},
        merging={"num_merged": 1, "layers": {"0": {"0": {"weight": 0.75, "merged": [{"id": 1, "weight": 0.25}]}}}},
        recalibration={"steps": 4, "layers": [0, 1], "loss_before": 0.5, "loss_after": 0.25, "applied": True},
        extra={"future_field": {"kept": True}},
    )


def test_round_trip_field_by_field(tmp_path):
    report = _full_report()
    assert all(getattr(report, f.attr) is not None for f in FIELDS)  # the fixture covers every field
    path = report.save(tmp_path)
    assert path == tmp_path / REPORT_FILE
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert on_disk == report.to_dict()
    assert list(on_disk) == [f.key for f in FIELDS] + ["future_field"]  # the file's layout, in its order
    assert on_disk["kept_ids"] == {"0": [0, 2], "1": [1, 2, 3]} and on_disk["model_type"] == "mixtral"
    assert on_disk["config"]["num_samples"] == 8 and on_disk["format"] == "stock"
    loaded = PruningReport.load(tmp_path)
    for f in dataclasses.fields(PruningReport):
        assert getattr(loaded, f.name) == getattr(report, f.name), f.name
    assert loaded.kept_ids == {0: [0, 2], 1: [1, 2, 3]} and isinstance(loaded.calibration, Calibration)
    assert loaded.calibration.loaded_from == "/tmp/t.jsonl" and loaded.calibration.extra == {"split": "train"}
    assert loaded == report
    assert loaded.removed_fraction == 3 / 8


def test_a_folder_without_a_report_loads_as_none(tmp_path):
    assert PruningReport.load(tmp_path) is None
    empty = PruningReport()
    assert empty.to_dict() == {} and len(empty) == 0
    assert PruningReport.load(empty.save(tmp_path).parent) == empty


# A report as DiEPPruner + `diep-hub run` wrote it before PruningReport existed (layer keys as strings, "config",
# "model_type", "previous_pruning": null, no "format"), with a made-up key a later version might add.
OLD_REPORT = """{
  "config": {"sparsity": 0.5, "method": "diep", "selection": "global", "dataset": "<list of 40 strings>",
             "num_samples": 8, "seq_len": 16, "seed": 0},
  "model_type": "mixtral",
  "method": "diep",
  "reference": "https://arxiv.org/abs/2509.16105",
  "ranking": "softmax(alpha)*beta",
  "seed": 0,
  "sparsity": 0.5,
  "selection": "global",
  "num_removed": 3,
  "num_total": 8,
  "rounding": "K = round_half_up(0.5 x 8 routed experts = 4.0000) = 4 removed in total",
  "selection_plan": {"keep": {"0": [0, 1, 2], "1": [4, 5, 6, 7]}, "num_removed": 3, "mode": "global"},
  "experts_before": {"0": 8, "1": 8},
  "kept_ids": {"0": [0, 1, 2], "1": [4, 5, 6, 7]},
  "kept_original_ids": {"0": [0, 1, 2], "1": [4, 5, 6, 7]},
  "per_layer_kept": {"0": 3, "1": 4},
  "scores": {"0": [0.9, 0.8, 0.7, 0.1, 0.1, 0.1, 0.1, "nan"], "1": [0.1, 0.1, 0.1, 0.1, 0.5, 0.6, 0.7, 0.8]},
  "details": {"mode": "gated", "alpha_optimizer_steps": 3, "beta_optimizer_steps": 1},
  "calibration_shape": [8, 16],
  "wall_seconds": 2.25,
  "scoring_seconds": 1.5,
  "peak_memory": {"cpu_rss_start_bytes": 100, "cpu_rss_peak_bytes": 200, "method": "process RSS"},
  "versions": {"python": "3.11.7", "diep_hub": "0.1.0", "torch": "2.13.0", "datasets": null},
  "previous_pruning": null,
  "alpha": {"0": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], "1": [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]},
  "beta": {"0": 1.5, "1": 0.5},
  "loss_curve": [{"total": 3.0, "ce": 2.5, "recon": 0.5}, {"total": 2.0, "ce": 1.75, "recon": 0.25}],
  "calibration": {"dataset": "diep-hub/tiny-text", "loaded_from": "/cache/tiny-text.jsonl", "num_samples": 8,
                  "seq_len": 16},
  "skipping": {"kernel": "linear", "layers": {"0": {"gamma1": 0.4375, "measured_skip_rate": 0.125}}},
  "added_by_a_later_version": [1, 2]
}
"""


def test_old_layout_report_loads_typed_and_keeps_its_layout(tmp_path):
    (tmp_path / REPORT_FILE).write_text(OLD_REPORT, encoding="utf-8")
    report = PruningReport.load(tmp_path)
    assert report.family == "mixtral" and report.format is None and report.base_model is None
    assert report.pruner_config["dataset"] == "<list of 40 strings>"
    assert report.kept_ids == {0: [0, 1, 2], 1: [4, 5, 6, 7]} and report.experts_before == {0: 8, 1: 8}
    assert report.per_layer_kept == {0: 3, 1: 4} and report.beta == {0: 1.5, 1: 0.5}
    assert report.scores[0][:3] == [0.9, 0.8, 0.7] and report.scores[0][7] != report.scores[0][7]  # "nan": NaN
    assert report.calibration == Calibration("diep-hub/tiny-text", 8, 16, "/cache/tiny-text.jsonl")
    assert report.previous_pruning is None and report.versions["datasets"] is None
    assert report.extra == {"added_by_a_later_version": [1, 2]}
    # Written back, it is the same file but for the null it no longer spells out.
    expected = json.loads(OLD_REPORT)
    del expected["previous_pruning"]
    again = tmp_path / "again"
    again.mkdir()
    assert json.loads(report.save(again).read_text(encoding="utf-8")) == expected
    # The mapping of the JSON form: what `pruner.report[...]` read when the report was a dict.
    assert report["kept_ids"] == expected["kept_ids"] and report["config"] == expected["config"]
    assert report.get("previous_pruning") is None and "format" not in report and "scores" in report
    assert to_jsonable(report) == expected


def _old_checkpoint(tmp_path: Path, *, stock: bool) -> tuple[Path, dict]:
    """A pruned tiny Mixtral saved with the old report, as `diep-hub run` left it before this change."""
    keep = {i: [0, 2, 4, 6] for i in range(4)} if stock else {0: [0, 1, 2], 1: [4, 5, 6, 7]}
    model = diep_hub.prune_experts(tiny_model("mixtral"), keep)
    old = json.loads(OLD_REPORT)
    if stock:  # the stock config has no per-layer fields: the report's plan is the only record of the experts
        old["kept_ids"] = old["kept_original_ids"] = {str(i): ids for i, ids in keep.items()}
        old["experts_before"] = {str(i): 8 for i in keep}
    folder = tmp_path / ("stock" if stock else "diep")
    diep_hub.save_pruned(model, folder, stock_format=stock, extra_files={REPORT_FILE: json.dumps(old, indent=2)})
    return folder, keep


def test_old_diep_checkpoint_still_inspects(tmp_path):
    folder, keep = _old_checkpoint(tmp_path, stock=False)
    info = inspect_checkpoint(folder)
    assert (info["model_type"], info["method"], info["selection"], info["target_sparsity"]) == (
        "diep_mixtral", "diep", "global", 0.5)
    assert [(r["layer"], r["kept"], r["original"], r["kept_ids"]) for r in info["layers"]] == [
        (0, 3, 8, [0, 1, 2]), (1, 4, 8, [4, 5, 6, 7]), (2, 8, 8, list(range(8))), (3, 8, 8, list(range(8)))]
    assert (info["experts_kept"], info["experts_original"]) == (23, 32)
    assert "method:      diep (global selection), target sparsity 0.5" in format_inspection(info)
    config = json.loads((folder / "config.json").read_text())
    view = PruningReport.for_checkpoint(config, PruningReport.load(folder))
    assert (view.family, view.format) == ("mixtral", "diep")


def test_old_stock_checkpoint_inspects_from_its_report(tmp_path):
    folder, keep = _old_checkpoint(tmp_path, stock=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mixtral" and "kept_expert_ids" not in config
    info = inspect_checkpoint(folder)
    assert [(r["layer"], r["kept"], r["original"], r["kept_ids"]) for r in info["layers"]] == [
        (i, 4, 8, ids) for i, ids in keep.items()]
    assert info["method"] == "diep" and info["sparsity"] == 0.5
    view = PruningReport.for_checkpoint(config, PruningReport.load(folder))
    assert (view.family, view.format) == ("mixtral", "stock")


@pytest.mark.parametrize(
    "content, words",
    [
        (b'{"method": "frequency",', ["is not valid JSON", "line 1", "column"]),
        (b'["method", "frequency"]', ["holds a JSON list, expected an object"]),
        (b'{"kept_ids": [0, 1]}', ["'kept_ids' is [0, 1]", 'expected an object {"<layer index>": [ids]}']),
        (b'{"kept_ids": {"first": [0, 1]}}', ["'kept_ids' is 'first'", "layer indices (0, 1, ...) as keys"]),
        (b'{"sparsity": "half"}', ["'sparsity' is 'half'", "expected a number"]),
        (b'{"scores": {"0": [0.5, null]}}', ["'scores.0[1]' is None", "expected a number"]),
        (b'{"format": "gguf"}', ["'format' is 'gguf'", "expected one of ['diep', 'stock']"]),
        (b'{"method": "diep", "seed": 1.5}', ["'seed' is 1.5", "expected an integer"]),
    ],
    ids=["truncated", "a-list", "kept-ids-a-list", "layer-not-a-number", "sparsity-text", "score-null",
         "unknown-format", "seed-float"],
)
def test_corrupt_report_is_a_corrupt_file_error_naming_it(tmp_path, content, words):
    path = tmp_path / REPORT_FILE
    path.write_bytes(content)
    with pytest.raises(CorruptFileError) as info:
        PruningReport.load(tmp_path)
    message = str(info.value)
    assert f"{REPORT_FILE} {path}" in message
    for word in words:
        assert word in message


def test_a_corrupt_report_stops_inspect_before_anything_else(tmp_path):
    folder, _ = _old_checkpoint(tmp_path, stock=False)
    (folder / REPORT_FILE).write_text('{"per_layer_kept": {"0": "three"}}')
    with pytest.raises(CorruptFileError, match=r"pruning_report.json .*'per_layer_kept.0' is 'three', expected an int"):
        inspect_checkpoint(folder)


def test_for_checkpoint_completes_the_report_from_the_config_record():
    report = PruningReport(method="reap", seed=4)
    config = {
        "model_type": "diep_qwen3_moe",
        "diep_pruning": {"method": "diep", "sparsity": 0.25, "selection": "uniform", "seed": 9, "num_removed": 8,
                         "num_total": 32, "calibration": {"dataset": "allenai/c4", "num_samples": 128,
                                                          "seq_len": 2048}},
    }
    view = PruningReport.for_checkpoint(config, report)
    assert (view.method, view.seed) == ("reap", 4)  # the report wins where it has the field
    assert (view.sparsity, view.selection, view.num_removed, view.num_total) == (0.25, "uniform", 8, 32)
    assert view.calibration == Calibration("allenai/c4", 128, 2048)
    assert (view.family, view.format) == ("qwen3_moe", "diep")
    assert report.to_dict() == {"method": "reap", "seed": 4}  # the report itself is unchanged
    # The pruner settings name the calibration data when the report has no calibration of its own.
    settings = PruningReport(pruner_config={"dataset": "local.jsonl", "num_samples": 4, "seq_len": 8})
    assert PruningReport.for_checkpoint({}, settings).calibration == Calibration("local.jsonl", 4, 8)
    assert PruningReport.for_checkpoint({"model_type": "mixtral"}).format == "stock"


def test_setting_a_key_decodes_it_into_its_field():
    report = PruningReport()
    report["calibration"] = {"dataset": "diep-hub/tiny-text", "loaded_from": "x.jsonl", "num_samples": 2,
                             "seq_len": 4}
    report["skipping"] = {"kernel": "linear", "layers": {0: {"gamma1": 0.5}}}
    assert report.calibration == Calibration("diep-hub/tiny-text", 2, 4, "x.jsonl")
    assert report.skipping == {"kernel": "linear", "layers": {"0": {"gamma1": 0.5}}}
    with pytest.raises(ConfigError, match=r"PruningReport: 'seed' is 'x', expected an integer"):
        report["seed"] = "x"
    with pytest.raises(ConfigError, match=r"PruningReport: 'num_total' is 2.5, expected an integer"):
        PruningReport(num_total=2.5)


def test_experts_table_reads_the_typed_report_and_its_json_form():
    report = PruningReport(experts_before={0: 8}, kept_original_ids={10: [1, 2], 0: [5, 6, 7]})
    rows = [{"layer": 0, "kept": 3, "original": 8, "kept_ids": [5, 6, 7]},
            {"layer": 10, "kept": 2, "original": None, "kept_ids": [1, 2]}]
    assert experts_table({}, report) == rows == experts_table({}, report.to_dict())


@pytest.mark.usefixtures("one_torch_thread")
def test_the_pruner_fills_a_typed_report_and_saves_it_with_its_format(tmp_path):
    pruner = DiEPPruner(sparsity=0.5, method="frequency", selection="uniform", dataset=pruner_texts(), num_samples=8,
                        seq_len=16, batch_size=4, progress=False)
    with pytest.raises(ConfigError, match="nothing to save yet"):
        pruner.save(tiny_model("mixtral"), tmp_path / "early")
    model = pruner.prune_model(tiny_model("mixtral"), pruner_tokenizer())
    report = pruner.report
    assert isinstance(report, PruningReport)
    assert (report.family, report.format, report.method, report.selection) == ("mixtral", "diep", "frequency",
                                                                               "uniform")
    assert report.kept_ids == dict(enumerate(model.config.kept_expert_ids)) == report.kept_original_ids
    assert report.per_layer_kept == {i: 4 for i in range(4)} and report.experts_before == {i: 8 for i in range(4)}
    assert (report.num_removed, report.num_total, report.calibration_shape) == (16, 32, [8, 16])
    assert report.calibration == Calibration("<list of 40 strings>", 8, 16)
    assert report.pruner_config == pruner.to_dict() and report.alpha is None  # DiEP's search fields only for DiEP

    pruner.save(model, tmp_path / "diep")
    pruner.save(model, tmp_path / "stock", stock_format=True)
    assert PruningReport.load(tmp_path / "diep") == report
    stock = PruningReport.load(tmp_path / "stock")
    assert stock == dataclasses.replace(report, format="stock") and report.format == "diep"
    assert json.loads((tmp_path / "stock" / "config.json").read_text())["model_type"] == "mixtral"


# ------------------------------------------------------------------------------------------------ names once
FILE_NAMES = ("pruning_report.json", "diep_recipe.json", "evaluation.json")


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String literals of a module's code (f-string parts included), leaving out docstrings: prose may name a
    file, code must take the name from checkpoint/layout.py."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_checkpoint_file_names_are_string_literals_only_in_layout():
    layout = PACKAGE / "checkpoint" / "layout.py"
    found = {name: sorted(value for _, value in _code_strings(layout) if value == name) for name in FILE_NAMES}
    assert found == {name: [name] for name in FILE_NAMES}  # defined there, once each
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
        for path in sorted(PACKAGE.rglob("*.py")) if path != layout
        for line, value in _code_strings(path) for name in FILE_NAMES if name in value
    ]
    assert offenders == [], "import the name from diep_hub.checkpoint.layout instead"
