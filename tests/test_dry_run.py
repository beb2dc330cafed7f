"""The dry run tells the truth: it refuses what prune refuses (same checks, same words, non-zero exit), its estimates
come from the stated cost model with measured constants, and offline it fails at once or uses a shipped config."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from diep_hub import dry_run, preflight
from diep_hub.dry_run import DEVICE_COSTS, CostInputs, cost_model
from diep_hub.errors import ConfigError
from diep_hub.pipeline.plan import resolve_plan
from diep_hub.recipe import load_recipe
from tests.helpers.fault_catalogue import error_lines, run_cli

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny.yaml"
MIXTRAL = ROOT / "recipes" / "mixtral-8x7b-diep-50.yaml"


def _tiny_recipe(tmp_path: Path, **pruning) -> Path:
    data = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    data["pruning"].update(pruning)
    data["evaluation"]["enabled"] = False
    data["skipping"]["enabled"] = False
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _message(stderr: str) -> str:
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    return lines[0].split(": error: ", 1)[1]


# ------------------------------------------------------------------------------------------------ feasibility
def test_infeasible_sparsity_dry_run_exits_like_the_run_and_prune(tmp_path, monkeypatch):
    """sparsity 0.9 on 4 layers of 8 experts, top-2: the dry run, the real run (refused in its prune stage, after
    loading) and `prune` all exit 2 with one message; only the name of the setting differs (recipe field / flag)."""
    from diep_hub import model_loading
    from diep_hub.tiny import build_tiny_model

    recipe = _tiny_recipe(tmp_path, sparsity=0.9)
    dry = run_cli(["run", str(recipe), "--dry-run"])
    # the real run's model, untrained (the refusal comes before calibration; training would only cost time)
    monkeypatch.setattr(model_loading, "load_model", lambda load: build_tiny_model(train_steps=0))
    real = run_cli(["run", str(recipe), "--output", str(tmp_path / "out")])
    pruned = run_cli(["prune", "diep-hub/tiny-mixtral", "--output", str(tmp_path / "out2"), "--sparsity", "0.9",
                      "--dataset", "diep-hub/tiny-text", "--dataset-config", "", "--num-samples", "4",
                      "--seq-len", "64"])
    assert (dry.code, real.code, pruned.code) == (2, 2, 2), (dry.stderr, real.stderr, pruned.stderr)
    assert _message(dry.stderr) == _message(real.stderr)
    assert "largest feasible sparsity is 0.7500" in _message(dry.stderr)
    # `prune` words the same refusal with its flags (--sparsity, --min-experts-per-layer...) where `run` names the
    # recipe fields: the finding and the numbers are the same
    dry_core = _message(dry.stderr).replace("pruning.sparsity: 0.9", "S").split(". Lower the sparsity")[0]
    prune_core = _message(pruned.stderr).replace("--sparsity 0.9", "S").split(". Lower the sparsity")[0]
    assert dry_core == prune_core and "S asks to remove 29 of 32 routed experts" in dry_core
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_criterion_limit_is_refused_by_the_dry_run_with_prunes_message(tmp_path):
    """NAEE on 16 experts keeping 8 would try C(16, 8) = 12,870 subsets, above its limit: prune refuses before
    calibration (the criterion's check), and so does the dry run, with the same exception text."""
    from diep_hub.pruner import DiEPPruner
    from tests.helpers.tiny_models import tiny_model

    model = tiny_model("mixtral", num_local_experts=16)
    folder = tmp_path / "model16"
    model.config.save_pretrained(folder)
    with pytest.raises(ConfigError) as from_prune:
        DiEPPruner(method="naee", sparsity=0.5, dataset="diep-hub/tiny-text").prune_model(model, None)
    recipe = load_recipe(_write(tmp_path / "r.yaml", {
        "model": {"id": str(folder), "dtype": "float32"},
        "pruning": {"method": "naee", "sparsity": 0.5,
                    "calibration": {"dataset": "diep-hub/tiny-text", "config": None, "seq_len": 64}},
        "evaluation": {"enabled": False},
    }))
    with pytest.raises(ConfigError) as from_dry_run:
        dry_run.estimate(resolve_plan(recipe))
    assert "12,870 subsets" in str(from_prune.value)
    assert str(from_dry_run.value) == str(from_prune.value)
    result = run_cli(["run", str(tmp_path / "r.yaml"), "--dry-run"])
    assert result.code == 2 and "12,870 subsets" in _message(result.stderr)


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- cost model
FIXED = CostInputs(
    params_total=1_000_000, params_active=400_000, params_search=400_000, bytes_per_param=4, search_tokens=2048,
    search_passes=13, eval_tokens=1024, evaluations=2, skipping_tokens=512, batch_size=8, seq_len=64, num_layers=4,
    hidden_size=64, expert_width=256, vocab_size=40, eval_batch_size=16, eval_seq_len=64, search_parameters=64,
)


def test_cost_model_is_the_stated_formula_for_fixed_inputs():
    c = DEVICE_COSTS["cpu"]
    out = cost_model(FIXED, c)
    flops = 2 * (400_000 * 2048 * 13 + 400_000 * (1024 * 2 + 512))
    assert out["flops"] == flops
    assert out["seconds"] == pytest.approx(c.fixed_seconds + 2 * c.seconds_per_evaluation + flops / c.flops_per_second)
    search_act = 8 * 64 * (4 * (12 * 64 + 3 * 256) + 2 * 40) * 4
    eval_act = 16 * 64 * 2 * 40 * 4
    assert out["activation_bytes"] == max(search_act, eval_act) == search_act
    assert out["peak_bytes"] == pytest.approx(c.baseline_bytes + c.weight_copies * 4_000_000 + search_act + 16 * 64)
    # every term moves the result the way the formula says
    assert cost_model(FIXED.__class__(**{**FIXED.__dict__, "evaluations": 0}), c)["seconds"] < out["seconds"]
    assert cost_model(FIXED.__class__(**{**FIXED.__dict__, "search_passes": 26}), c)["seconds"] > out["seconds"]


def test_cost_model_counts_merging_and_recalibration_as_stated():
    """The edit terms: 2 x (N_active x calibration tokens x edit passes + every expert's parameters x merging
    tokens) FLOPs at R, and the teacher's hidden states on top of the peak; zero edits leave the estimate as it was."""
    c = DEVICE_COSTS["cpu"]
    plain = cost_model(FIXED, c)
    edited = cost_model(CostInputs(**{**FIXED.__dict__, "edit_passes": 7.5, "merge_tokens": 1024,
                                      "params_experts": 3_000_000, "teacher_bytes": 5_000_000}), c)
    edit_flops = 2 * (400_000 * 2048 * 7.5 + 3_000_000 * 1024)
    assert edited["flops"] - plain["flops"] == edit_flops
    assert edited["edit_seconds"] == pytest.approx(edit_flops / c.flops_per_second)
    assert edited["seconds"] - plain["seconds"] == pytest.approx(edit_flops / c.flops_per_second)
    assert edited["peak_bytes"] - plain["peak_bytes"] == 5_000_000
    assert plain["edit_seconds"] == 0 and plain["teacher_bytes"] == 0
    # merging's neuron alignment: per merged expert a float64 I x I x features matmul at R64 and an I x I assignment
    # (a x I^2 seconds), and one alignment's float64 buffers on the peak
    aligned = cost_model(CostInputs(**{**FIXED.__dict__, "aligned_merges": 3, "align_width": 1000,
                                       "align_features": 300}), c)
    per_merge = 2 * 1000**2 * 300 / c.float64_flops_per_second + c.assignment_seconds_per_n2 * 1000**2
    assert aligned["alignment_seconds"] == pytest.approx(3 * per_merge)
    assert aligned["seconds"] - plain["seconds"] == pytest.approx(3 * per_merge)
    assert aligned["flops"] == plain["flops"]  # the assignment is not a FLOP count: it has its own constant
    assert aligned["peak_bytes"] - plain["peak_bytes"] == 8 * (2 * 1000 * 300 + 2 * 1000**2)


def test_dry_run_counts_the_recipes_merging_and_recalibration(tmp_path):
    """A recipe that merges and recalibrates: one merging pass plus every expert on min(1024, calibration tokens),
    and recalibration's teacher pass, loss before and after, and 3 passes a step over batch_size of num_samples
    sequences; the teacher's float32 hidden states are added to the peak. Without them the terms are zero."""
    from diep_hub.cli.output import run_text

    plain_recipe = load_recipe(_tiny_recipe(tmp_path))
    plain = dry_run.estimate(resolve_plan(plain_recipe))
    (tmp_path / "edited").mkdir()
    recipe = load_recipe(_tiny_recipe(tmp_path / "edited", merge="output_cosine",
                                      recalibration={"enabled": True, "steps": 20}))
    est = dry_run.estimate(resolve_plan(recipe))
    x, p = CostInputs(**est["cost_inputs"]), recipe.pruning
    num_samples, seq_len, batch = p.calibration.num_samples, p.calibration.seq_len, p.search.batch_size
    assert (num_samples, seq_len, batch) == (32, 64, 8)
    assert x.edit_passes == pytest.approx(1 + 3 + 3 * 20 * 8 / 32)  # 19
    assert x.merge_tokens == 1024 and x.params_experts == est["params_experts"] == 4 * 8 * 3 * 64 * 96
    assert x.teacher_bytes == 32 * 64 * 64 * 4
    # merging aligns each of the 16 removed experts (the tiny Mixtral's gated layout): width 96, 3 x 64 features
    assert (x.aligned_merges, x.align_width, x.align_features) == (16, 96, 192)
    c = DEVICE_COSTS["cpu"]
    flops = 2 * (x.params_active * 32 * 64 * 19 + x.params_experts * 1024)
    alignment = 16 * (2 * 96**2 * 192 / c.float64_flops_per_second + c.assignment_seconds_per_n2 * 96**2)
    assert est["edit_seconds_estimate"] == pytest.approx(flops / c.flops_per_second + alignment)
    assert est["run_seconds_estimate"] - plain["run_seconds_estimate"] == pytest.approx(
        flops / c.flops_per_second + alignment)
    alignment_bytes = 8 * (2 * 96 * 192 + 2 * 96**2)
    assert est["peak_bytes_estimate"] - plain["peak_bytes_estimate"] == 32 * 64 * 64 * 4 + alignment_bytes
    assert "19 merging/recalibration passes" in est["assumptions"] and "teacher states" in est["assumptions"]
    assert "16 aligned merges" in est["assumptions"]
    assert "merging and recalibration ~" in run_text({"dry_run": True, "estimate": est, "output_dir": "o",
                                                      "push": False})
    px = CostInputs(**plain["cost_inputs"])
    assert (px.edit_passes, px.merge_tokens, px.teacher_bytes, px.aligned_merges) == (0, 0, 0, 0)
    assert plain["edit_seconds_estimate"] == 0
    assert "merging/recalibration" not in plain["assumptions"] and "aligned" not in plain["assumptions"]
    # merging without alignment: the same passes, no alignment term
    (tmp_path / "unaligned").mkdir()
    unaligned = dry_run.estimate(resolve_plan(load_recipe(_tiny_recipe(
        tmp_path / "unaligned", merge="output_cosine", merge_alignment="none",
        recalibration={"enabled": True, "steps": 20}))))
    ux = CostInputs(**unaligned["cost_inputs"])
    assert (ux.aligned_merges, ux.edit_passes, ux.merge_tokens) == (0, x.edit_passes, 1024)
    assert est["run_seconds_estimate"] - unaligned["run_seconds_estimate"] == pytest.approx(alignment)


def test_tiny_recipe_estimate_uses_the_recipes_numbers_and_lands_in_the_measured_band():
    """The tiny recipe's inputs come from its config and settings; with the CPU constants the estimate reproduces
    the calibration runs recorded in dry_run.CALIBRATION within the stated tolerances (no timing here)."""
    recipe = load_recipe(TINY)
    est = dry_run.estimate(resolve_plan(recipe))
    x = CostInputs(**est["cost_inputs"])
    p = recipe.pruning
    assert x.search_tokens == p.calibration.num_samples * p.calibration.seq_len == 2048
    assert x.search_passes == 1 + 3 * p.search.epochs
    assert x.evaluations == 2
    assert x.eval_tokens == recipe.evaluation.perplexity.num_samples * recipe.evaluation.perplexity.seq_len
    assert x.params_total == est["params_total"] and x.params_active == est["params_active_per_token"]
    assert est["run_seconds_estimate"] == pytest.approx(cost_model(x, DEVICE_COSTS["cpu"])["seconds"])
    assert "time = T0" in est["assumptions"] and "peak = M0" in est["assumptions"]
    for run in dry_run.CALIBRATION:
        got = cost_model(CostInputs(**run["inputs"]), DEVICE_COSTS["cpu"])
        assert got["seconds"] == pytest.approx(run["cpu_seconds"], rel=dry_run.TIME_TOLERANCE), run["name"]
        assert got["peak_bytes"] == pytest.approx(run["max_rss_bytes"], rel=dry_run.MEMORY_TOLERANCE), run["name"]


# --------------------------------------------------------------------------------------------------- offline
@pytest.fixture
def connections(monkeypatch):
    """Every TCP connection attempt, failing as on a machine without network."""
    calls = []

    def refuse(address, timeout=None, *args, **kwargs):
        calls.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return calls


@pytest.fixture
def no_shipped_configs(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    monkeypatch.setattr(dry_run, "shipped_configs_folder", lambda: folder)
    return folder


@pytest.fixture
def config_reads(monkeypatch):
    from diep_hub import model_loading

    calls = []
    monkeypatch.setattr(model_loading, "load_config", lambda load: calls.append(load) or pytest.fail("read"))
    return calls


def test_offline_mode_fails_at_once_without_a_connection(connections, no_shipped_configs, config_reads):
    plan = resolve_plan(load_recipe(MIXTRAL))
    with pytest.raises(ConfigError) as exc:
        dry_run.dry_run_config(plan)
    text = str(exc.value)
    assert "'mistralai/Mixtral-8x7B-v0.1' is a Hub repo" in text and "offline mode is on" in text
    assert "no verified copy of this model's config ships with diep_hub" in text
    assert connections == [] and config_reads == []  # no attempt at all, no retry loop


def test_unreachable_hub_is_one_short_attempt(monkeypatch, connections, no_shipped_configs, config_reads):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    plan = resolve_plan(load_recipe(MIXTRAL))
    with pytest.raises(ConfigError, match=r"huggingface.co:443 cannot be reached .*one attempt"):
        preflight.check_model_reachable(plan.load)
    assert connections == [(("huggingface.co", 443), preflight.CONNECT_TIMEOUT)]
    with pytest.raises(ConfigError):
        dry_run.dry_run_config(plan)
    assert len(connections) == 2 and config_reads == []  # one attempt per command, never the loader's retries


def test_shipped_config_makes_the_real_recipe_dry_run_work_offline(tmp_path, monkeypatch, connections,
                                                                   no_shipped_configs, config_reads):
    """A copy in the shipped-configs folder (here a test's own small Mixtral config, standing in for a verified
    copy) is used offline: the output names it and its source, and the expert counts come from it."""
    from transformers import MixtralConfig

    copy = no_shipped_configs / "mistralai--Mixtral-8x7B-v0.1.json"
    copy.write_text(MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2).to_json_string(), encoding="utf-8")
    source = {"repo": "example/mirror", "path": "config.json", "commit": "0" * 40}
    copy.with_name("mistralai--Mixtral-8x7B-v0.1.source.json").write_text(json.dumps(source), encoding="utf-8")
    monkeypatch.setattr(preflight, "_task_problems", lambda recipe: [])  # mmlu etc.: indexing lm-eval takes long
    recipe = load_recipe(MIXTRAL)
    summary = dry_run.dry_run_summary(recipe, resolve_plan(recipe))
    est = summary["estimate"]
    assert est["config_source"].startswith(f"shipped copy {copy}")
    assert "example/mirror" in est["config_source"] and "0" * 40 in est["config_source"]
    assert (est["num_moe_layers"], est["experts_per_layer"], est["experts_total"]) == (3, [8], 24)
    assert est["experts_removed"] == 12
    assert any("allenai/c4" in note for note in est["notes"])  # the run itself will need the Hub dataset
    assert connections == [] and config_reads == []


def test_shipped_configs_have_their_source():
    """Every shipped config has a source record naming the stored copy it was taken from."""
    folder = dry_run.shipped_configs_folder()
    for config in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if config.name.endswith(".source.json"):
            continue
        record = json.loads(config.with_name(config.name.removesuffix(".json") + ".source.json").read_text())
        assert {"repo", "path", "commit"} <= set(record), config
