"""The whole tiny recipe through diep-hub (slow): run, reload with remote code, card, inspect, reproduce, eval,
push, the stock format, and the summary a run ends with."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from diep_hub.cli import main
from diep_hub.modeling import register_with_auto_classes
from diep_hub.tiny import build_tiny_model
from tests.helpers.console import ROOT, run_console
from tests.helpers.fresh_process import reload_each_family
from tests.helpers.numerics import assert_close_logits, assert_same_greedy

TINY = ROOT / "recipes" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`diep-hub run recipes/tiny.yaml --output DIR --json` in a fresh process, once for the module."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    proc = run_console("run", str(TINY), "--output", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)


@pytest.mark.slow
def test_run_tiny_writes_a_checkpoint_that_reloads_with_remote_code(tiny_run):
    out, summary = tiny_run
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "configuration_diep.py", "modeling_diep.py", "pruning_report.json", "recipe.yaml",
            "README.md", "evaluation.json", "tokenizer.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "diep_mixtral"
    assert [r["kept"] for r in summary["experts"]] == config["num_experts_per_layer"]
    assert sum(config["num_experts_per_layer"]) == 16  # 50% of 4 x 8 experts
    assert [r["kept_ids"] for r in summary["experts"]] == config["kept_expert_ids"]

    # A process that never imports diep_hub loads the folder through its remote code ...
    ids = [[1, 14, 7, 8, 17, 11, 19, 5, 6]]
    per_model = """
    with torch.no_grad():
        out[family] = model(input_ids=ids).logits
    """
    remote, _ = reload_each_family(out.parent, [out.name], torch.tensor(ids), per_model)
    assert remote["diep_hub_imported"] is False
    remote = remote[out.name]
    # ... and gives the logits of the same checkpoint loaded through diep_hub's registered classes.
    register_with_auto_classes()
    local = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = local(input_ids=torch.tensor(ids)).logits
    assert_close_logits(remote, expected)  # another process and load path: the stated tolerance, same greedy tokens
    assert_same_greedy(remote, expected)


@pytest.mark.slow
def test_run_tiny_card_parses_and_carries_the_evaluation(tiny_run):
    from huggingface_hub import ModelCard

    out, summary = tiny_run
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation == json.loads(json.dumps(summary["evaluation"]))
    assert {"base", "pruned"} <= set(evaluation)
    # Every result in the card's model-index is the number the run measured on the pruned model, for that task
    # and metric.
    assert card.data.eval_results, "the tiny recipe evaluates, so the card must carry results"
    tasks = evaluation["pruned"]["lm_eval"]["tasks"]
    for result in card.data.eval_results:
        assert result.metric_value == tasks[result.dataset_name]["metrics"][result.metric_type], result
    assert {r.dataset_name for r in card.data.eval_results} == {"diep_tiny_arith", "diep_tiny_reverse"}
    # Skipping: calibrated per layer, rates measured while the pruned model was evaluated, shown in the card.
    report = json.loads((out / "pruning_report.json").read_text())
    layers = report["skipping"]["layers"]
    assert set(layers) == {"0", "1", "2", "3"}
    for index, layer in layers.items():
        assert 0.0 < layer["gamma1"] <= 1.0 and layer["measured_slots"] > 0
        assert 0.0 <= layer["measured_skip_rate"] <= 1.0
        row = f"| {index} | {layer['gamma1']:.4f} | {layer['mean_pairwise_cka']:.4f} | "
        assert row + f"{100 * layer['calibration_skip_rate']:.1f}% | {100 * layer['measured_skip_rate']:.1f}% |" in (
            card.text
        )
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model"]["id"] == "diep-hub/tiny-mixtral" and recipe["pruning"]["sparsity"] == 0.5
    # the calibration data is named as the recipe names it, not by the cache file it was written to
    assert "| Calibration | diep-hub/tiny-text, 32 x 64 tokens |" in card.text


@pytest.mark.slow
def test_inspect_the_run(tiny_run):
    out, summary = tiny_run
    proc = run_console("inspect", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["layers"] == summary["experts"]
    assert (info["experts_kept"], info["experts_original"], info["sparsity"]) == (16, 32, 0.5)
    assert info["method"] == "diep" and info["has_recipe"] is True


@pytest.mark.slow
def test_reproduce_matches_the_run(tiny_run):
    out, _ = tiny_run
    proc = run_console("reproduce", str(out), "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["match"] is True
    assert {"kept_experts", "weights", "expert_scores", "evaluation"} <= set(result["checks"])
    assert result["checks"]["weights"]["tensors"] > 0 and result["checks"]["evaluation"]["compared"] > 0


@pytest.mark.slow
def test_reproduce_reports_edited_kept_ids(tiny_run, tmp_path):
    out, _ = tiny_run
    altered = tmp_path / "altered"
    shutil.copytree(out, altered)
    config = json.loads((altered / "config.json").read_text())
    layer = next(i for i, ids in enumerate(config["kept_expert_ids"]) if ids and len(ids) < 8)
    removed = next(e for e in range(8) if e not in config["kept_expert_ids"][layer])
    config["kept_expert_ids"][layer][0] = removed
    (altered / "config.json").write_text(json.dumps(config))
    proc = run_console("reproduce", str(altered), "--no-eval", "--json")
    assert proc.returncode == 1, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["match"] is False and result["checks"]["kept_experts"]["match"] is False
    assert result["checks"]["kept_experts"]["differences"][0]["layer"] == layer
    assert result["checks"]["weights"]["match"] is True


@pytest.mark.slow
def test_reproduce_reports_an_edited_weight(tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    out, _ = tiny_run
    altered = tmp_path / "altered"
    shutil.copytree(out, altered)
    weights = next(altered.glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = next(n for n in sorted(tensors) if "experts" in n)
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    proc = run_console("reproduce", str(altered), "--no-eval")
    assert proc.returncode == 1
    assert "MISMATCH" in proc.stdout and "weights: differs" in proc.stdout and "kept_experts: ok" in proc.stdout
    assert name in proc.stdout


@pytest.mark.slow
def test_run_with_push_publishes_the_checkpoint(hub_server, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    repo = f"{hub_server.user}/tiny-mixtral-diep-50"
    out = tmp_path / "out"
    assert main(["run", str(TINY), "--output", str(out), "--push", "--repo-id", repo, "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["pushed"]["repo_id"] == repo and summary["pushed"]["commit_url"]
    assert hub_server.token not in captured.out + captured.err
    remote = set(HfApi(endpoint=hub_server.endpoint).list_repo_files(repo, token=hub_server.token))
    local = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert local <= remote
    assert {"README.md", "recipe.yaml", "pruning_report.json", "evaluation.json", "modeling_diep.py"} <= remote


@pytest.mark.slow
def test_eval_of_the_saved_checkpoint_reproduces_the_run_scores(tiny_run):
    """Reloaded from disk (skipping tables included), the pruned model scores what the run recorded."""
    out, summary = tiny_run
    proc = run_console("eval", str(out), "--tasks", "diep_tiny_arith")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = json.loads(proc.stdout)["lm_eval"]["tasks"]["diep_tiny_arith"]["metrics"]
    recorded = summary["evaluation"]["pruned"]["lm_eval"]["tasks"]["diep_tiny_arith"]["metrics"]
    assert reloaded["acc"] == recorded["acc"]


@pytest.mark.slow
def test_eval_with_base_and_save_then_card_shows_retention(tiny_run, tmp_path):
    """`eval --base --save` writes evaluation.json into the folder and `card` turns it into the results table."""
    out, summary = tiny_run
    folder = tmp_path / "ckpt"
    shutil.copytree(out, folder)
    (folder / "evaluation.json").unlink()
    proc = run_console("eval", str(folder), "--tasks", "diep_tiny_arith", "--base", "diep-hub/tiny-mixtral", "--save")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((folder / "evaluation.json").read_text())
    assert saved == json.loads(proc.stdout)
    metric = lambda side: side["lm_eval"]["tasks"]["diep_tiny_arith"]["metrics"]["acc"]  # noqa: E731
    # the same numbers the run measured, for both models, and retention = pruned / base
    assert metric(saved["pruned"]) == metric(summary["evaluation"]["pruned"])
    assert metric(saved["base"]) == metric(summary["evaluation"]["base"])
    retention = saved["comparison"]["tasks"]["diep_tiny_arith"]["metrics"]["acc"]["retention"]
    assert retention == pytest.approx(metric(saved["pruned"]) / metric(saved["base"]))
    assert run_console("card", str(folder)).returncode == 0
    card = (folder / "README.md").read_text()
    assert f"{100 * retention:.2f}%" in card


@pytest.mark.slow
def test_stock_format_run_reproduces_and_its_card_says_stock(tmp_path):
    """Uniform selection saved in the stock architecture: no remote code, and `reproduce` still checks the kept
    experts (from pruning_report.json, since a stock config has no per-layer fields)."""
    recipe = yaml.safe_load(TINY.read_text())
    recipe["pruning"]["selection"] = "uniform"
    recipe["skipping"]["enabled"] = False
    recipe["evaluation"]["enabled"] = False
    recipe["output"]["stock_format"] = True
    recipe_file = tmp_path / "stock.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "stock"
    proc = run_console("run", str(recipe_file), "--output", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4 and "auto_map" not in config
    assert not (out / "modeling_diep.py").exists()
    card = (out / "README.md").read_text()
    assert "saved in the stock `mixtral` architecture (no remote" in card
    assert "trust_remote_code=True" not in card and "Engines that assume one expert count" not in card
    proc = run_console("reproduce", str(out), "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kept = json.loads(proc.stdout)["checks"]["kept_experts"]
    assert kept == {"match": True, "differences": []}



SUMMARY_RECIPE = {  # the tiny flow with small settings: frequency scoring, 20 items, 4 perplexity windows
    "model": {"id": "diep-hub/tiny-mixtral", "dtype": "float32"},
    "pruning": {"method": "frequency", "sparsity": 0.5, "seed": 0,
                "calibration": {"dataset": "diep-hub/tiny-text", "config": None, "num_samples": 8, "seq_len": 32},
                "search": {"batch_size": 8}},
    "skipping": {"enabled": False},
    "evaluation": {"tasks": ["diep_tiny_arith"], "limit": 20, "batch_size": 16, "memory": True,
                   "perplexity": {"dataset": "diep-hub/tiny-text", "config": None, "split": "test", "num_samples": 4,
                                  "seq_len": 32}},
}


def test_run_ends_with_a_summary_of_the_saved_values(tmp_path, monkeypatch):
    """`diep-hub run` prints kept experts per layer, retention with its standard error, the perplexity ratio,
    weight bytes before and after, the folder and the next commands; every value is the one saved in the folder
    (config.json, evaluation.json), and the next command runs."""
    import math

    import diep_hub.tiny
    from tests.helpers.fault_catalogue import run_cli

    monkeypatch.setattr(diep_hub.tiny, "build_offline_model",  # untrained: the summary, not the pruning, is tested
                        lambda model_id, *, dtype=torch.float32: build_tiny_model(seed=0, train_steps=0, dtype=dtype))
    recipe, out = tmp_path / "recipe.yaml", tmp_path / "out"
    recipe.write_text(yaml.safe_dump(SUMMARY_RECIPE))
    result = run_cli(["run", str(recipe), "--output", str(out)], monkeypatch)
    assert result.code == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()

    config = json.loads((out / "config.json").read_text())
    evaluation = json.loads((out / "evaluation.json").read_text())
    kept = config["num_experts_per_layer"]
    assert lines[0].startswith(f"saved {out} (frequency, sparsity 0.5) in ")
    assert lines[1] == f"experts kept per layer: {' '.join(map(str, kept))} ({sum(kept)} of 32)"

    # retention = pruned / base accuracy; its standard error from lm-eval's two standard errors (delta method)
    base, pruned = (evaluation[side]["lm_eval"]["tasks"]["diep_tiny_arith"] for side in ("base", "pruned"))
    b, p = base["metrics"]["acc"], pruned["metrics"]["acc"]
    retention = evaluation["comparison"]["average_retention"]
    assert retention == pytest.approx(p / b)
    se = retention * math.hypot(base["metrics"]["acc_stderr"] / b, pruned["metrics"]["acc_stderr"] / p)
    assert lines[2] == (f"retention: {100 * retention:.2f}% ± {100 * se:.2f}% (standard error; 1 task(s), "
                        f"{base['num_samples']} items)")
    assert base["num_samples"] == 20

    ppl = evaluation["comparison"]["perplexity"]
    assert ppl["ratio"] == pytest.approx(evaluation["pruned"]["perplexity"]["perplexity"]
                                         / evaluation["base"]["perplexity"]["perplexity"])
    assert lines[3] == f"perplexity: {ppl['base']:.4g} -> {ppl['pruned']:.4g} (ratio {ppl['ratio']:.3f})"

    before, after = (evaluation[side]["memory"]["parameter_bytes"] for side in ("base", "pruned"))
    assert lines[4] == f"weights: {before:,} -> {after:,} bytes ({100 * (after / before - 1):+.1f}%)"
    weights_file = (out / "model.safetensors").stat().st_size
    assert after < weights_file < after + 64 * 1024  # the tensors, plus the safetensors header

    assert lines[5:] == ["next:", f"  diep-hub inspect {out}", f"  diep-hub push REPO_ID {out}"]
    inspected = run_cli(["inspect", str(out), "--json"], monkeypatch)
    assert inspected.code == 0 and [r["kept"] for r in json.loads(inspected.stdout)["layers"]] == kept


@pytest.mark.slow
def test_a_merged_and_recalibrated_recipe_run_reproduces(tmp_path):
    """pruning.merge and pruning.recalibration (with output scales) in a recipe: recorded in config.json, the report
    and the card, and `reproduce` re-runs them and finds the same merges, scales and weights."""
    from diep_hub.checkpoint.reproduce import reproduce

    recipe = json.loads(json.dumps(SUMMARY_RECIPE))
    recipe["pruning"]["merge"] = "output_cosine"
    recipe["pruning"]["recalibration"] = {"enabled": True, "steps": 4, "lr": 0.01, "output_scales": True}
    recipe["evaluation"] = {"enabled": False}
    recipe_file, out = tmp_path / "recipe.yaml", tmp_path / "out"
    recipe_file.write_text(yaml.safe_dump(recipe))
    proc = run_console("run", str(recipe_file), "--output", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]

    config = json.loads((out / "config.json").read_text())
    record = config["diep_pruning"]
    assert (record["merge"], record["recalibrate_router"], record["recalibration_output_scales"]) == (
        "output_cosine", True, True)
    report = json.loads((out / "pruning_report.json").read_text())
    recalibration = report["recalibration"]
    assert recalibration["steps"] == 4 and recalibration["loss_after"] <= recalibration["loss_before"]
    kept = dict(zip(map(str, range(4)), config["num_experts_per_layer"]))
    assert {layer: len(scales) for layer, scales in recalibration["output_scales"].items()} == kept
    assert report["merging"]["num_merged"] == 16
    card = (out / "README.md").read_text()
    assert "### Merged experts" in card and "### Router recalibration" in card

    result = reproduce(out, evaluate_scores=False)
    checks = result["checks"]
    assert checks["merging"]["match"] and checks["recalibration"]["match"], checks
    assert checks["weights"] == {"match": True, "tensors": checks["weights"]["tensors"], "differences": [],
                                 "num_differences": 0}
    assert result["match"]
