"""The diep-hub command line: help, errors, dry runs, inspect, and the whole tiny recipe (run/reload/reproduce)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from diep_hub import prune_experts, save_pruned
from diep_hub.cli import EXIT_ERROR, build_parser, main
from diep_hub.tiny import build_tiny_model, tiny_config
from tests.helpers import hub_server as local_hub
from tests.helpers.numerics import assert_close_logits, assert_same_greedy

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny.yaml"
hub_server = local_hub.hub_server  # the local Hub fixture (tests/helpers/hub_server.py)
KEEP = {0: [0, 1, 2, 3, 4, 5, 6], 1: [1, 3, 5, 7], 2: [2, 6], 3: [0, 1, 2, 3, 4]}


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """Offline corpora are written under DIEP_HUB_CACHE: keep them out of the home folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIEP_HUB_CACHE", str(tmp_path_factory.mktemp("diep-hub-cache")))
        yield


def _cli(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed console script in a fresh process (offline env comes from conftest)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    exe = shutil.which("diep-hub")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "diep_hub.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("command", ["run", "prune", "eval", "card", "push", "inspect", "reproduce", "env"])
def test_every_command_has_examples_in_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"diep-hub {command}" in out


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "prune", "eval", "card", "push", "inspect", "reproduce", "env"):
        assert command in out
    assert "diep-hub run recipes/tiny.yaml" in out


def test_prune_flags_come_from_the_option_models(capsys):
    """Every prune flag's default is its recipe field's (the search's left unset, so the recipe's own applies), and
    ``--method``'s help lists the criteria registry."""
    from diep_hub.cli.parser import PRUNE_FLAGS, UNSET_BY_DEFAULT, recipe_field
    from diep_hub.criteria import available_criteria

    args = build_parser().parse_args(["prune", "m", "--output", "o"])
    for flag, path in PRUNE_FLAGS.items():
        model, name = recipe_field(path)
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        assert value == (None if flag in UNSET_BY_DEFAULT else model.model_fields[name].default), flag
    assert (args.sparsity, args.method, args.batch_size, args.seed, args.num_samples) == (0.5, "diep", 16, 0, 128)
    assert (args.dataset, args.dataset_config, args.data_file, args.search_mode) == ("allenai/c4", "en", None, None)
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "one of: " + ", ".join(available_criteria()) + " (default: diep)" in help_text
    assert "--search-mode SEARCH_MODE" in help_text and "one of: auto, gated, dense (default: auto)" in help_text


IMPORTED_HEAVY = (
    "import sys; {code}; "
    "print(sorted(m for m in ('torch','transformers','lm_eval','matplotlib','datasets') if m in sys.modules))"
)


@pytest.mark.parametrize("code", ["import diep_hub", "import diep_hub.cli; diep_hub.cli.build_parser()"],
                         ids=["import", "build-parser"])
def test_import_and_help_load_no_heavy_module(code):
    """``import diep_hub`` and building the CLI parser (``diep-hub --help``) import none of torch, transformers,
    lm-eval, matplotlib or datasets: the public names are lazy and the commands import what they use."""
    proc = subprocess.run([sys.executable, "-c", IMPORTED_HEAVY.format(code=code)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_import_registers_the_auto_classes_once_transformers_is_loaded():
    """README: ``import diep_hub; AutoModelForCausalLM.from_pretrained(path)`` needs no remote code. With
    transformers already imported, ``import diep_hub`` registers the diep_* classes; a lazy public name that
    loads the modeling code (``prune_experts``) registers them too."""
    script = (
        "import sys\n"
        "first = sys.argv[1] == 'transformers-first'\n"
        "if first:\n    import transformers\n"
        "import diep_hub\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "before = 'diep_mixtral' in CONFIG_MAPPING\n"
        "diep_hub.prune_experts\n"
        "print(before, 'diep_mixtral' in CONFIG_MAPPING)\n"
    )
    results = {}
    for order in ("transformers-first", "diep-hub-first"):
        proc = subprocess.run([sys.executable, "-c", script, order], capture_output=True, text=True, timeout=300,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[order] = proc.stdout.split()
    assert results == {"transformers-first": ["True", "True"], "diep-hub-first": ["False", "True"]}


# ---------------------------------------------------------------------------------------------------- errors
def test_missing_recipe_file_is_a_message_not_a_traceback(tmp_path):
    proc = _cli("run", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"diep-hub run: error: cannot read recipe {tmp_path / 'nope.yaml'}")
    assert "does not exist -> an existing YAML file, or a shipped recipe: " in proc.stderr
    assert "tiny" in proc.stderr


def test_invalid_recipe_lists_every_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"id": "a/b", "dtype": "int3"}, "pruning": {"sparsity": 7}}))
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"invalid recipe {bad} (2 problem(s))" in err
    assert "model.dtype: 'int3' -> Input should be" in err
    assert "pruning.sparsity: 7 -> is out of range; allowed: (0, 1)" in err
    assert err.count("\n") == 1, "every problem on the one error line"


def test_inspect_missing_folder_and_non_checkpoint(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing" / "dir")]) == 2
    assert "is neither a folder nor a Hub repo id" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no config.json -> not a model checkpoint" in capsys.readouterr().err


def test_output_folder_checked_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["run", str(TINY), "--output", str(out)]) == 2
    assert "exists and is not empty -> choose another --output or pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_push_without_repo_id_is_refused_before_work(tmp_path, capsys):
    assert main(["run", str(TINY), "--output", str(tmp_path / "o"), "--push"]) == 2
    assert "no repo id -> set publish.repo_id in the recipe or pass --repo-id" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_run_with_a_rejected_token_fails_before_the_model_loads(hub_server, tmp_path, monkeypatch, capsys):
    import diep_hub.model_loading

    def no_loading(recipe):
        raise AssertionError("the model must not be loaded when the push would fail")

    monkeypatch.setattr(diep_hub.model_loading, "load_model", no_loading)
    secret = "hf_not_a_real_token_0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "o"
    assert main(["run", str(TINY), "--output", str(out), "--push", "--repo-id", f"{hub_server.user}/x"]) == 2
    err = capsys.readouterr().err
    assert "rejected the token (401 Unauthorized)" in err and secret not in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------------- dry run
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


# ---------------------------------------------------------------------------------------------------- inspect
@pytest.fixture(scope="module")
def hand_pruned(tmp_path_factory):
    """A pruned checkpoint made without the pruner: explicit keep map, a report and a card with results."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    model, tokenizer = build_tiny_model(train_steps=0)
    prune_experts(model, KEEP)
    data = ModelCardData(
        base_model="diep-hub/tiny-mixtral", model_name="tiny-pruned",
        eval_results=[EvalResult(task_type="multiple-choice", dataset_type="diep_tiny_arith",
                                 dataset_name="diep_tiny_arith", metric_type="acc", metric_value=0.375)],
    )
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n# tiny pruned\n")
    report = {"method": "reap", "selection": "uniform", "sparsity": 0.4375}
    folder = tmp_path_factory.mktemp("hand") / "ckpt"
    save_pruned(model, folder, tokenizer=tokenizer, extra_files={"pruning_report.json": report, "README.md": str(card)})
    return folder


def test_inspect_reports_experts_method_and_results(hand_pruned, capsys):
    assert main(["inspect", str(hand_pruned), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [(r["layer"], r["kept"], r["original"], r["kept_ids"]) for r in info["layers"]] == [
        (i, len(ids), 8, ids) for i, ids in KEEP.items()
    ]
    assert (info["experts_kept"], info["experts_original"]) == (18, 32)
    assert info["sparsity"] == pytest.approx(1 - 18 / 32)
    assert (info["method"], info["selection"], info["target_sparsity"]) == ("reap", "uniform", 0.4375)
    assert info["model_type"] == "diep_mixtral" and info["base_model"] == "diep-hub/tiny-mixtral"
    assert info["results"] == [
        {"task": "multiple-choice", "dataset": "diep_tiny_arith", "metric": "acc", "value": 0.375}
    ]
    assert main(["inspect", str(hand_pruned)]) == 0
    text = capsys.readouterr().out
    assert "18 of 32 kept" in text and "    2     2/8     [2, 6]" in text and "diep_tiny_arith acc: 0.375" in text


def test_card_rebuilds_the_readme_from_the_folder(hand_pruned, tmp_path, capsys):
    from huggingface_hub import ModelCard

    folder = tmp_path / "ckpt"
    shutil.copytree(hand_pruned, folder)
    (folder / "README.md").unlink()
    assert main(["card", str(folder), "--stdout"]) == 0
    printed = capsys.readouterr().out
    assert not (folder / "README.md").exists()
    assert main(["card", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"card": f"{folder}/README.md"}
    card = ModelCard.load(folder / "README.md")
    assert str(card).strip() == printed.strip()
    assert {int(k): v for k, v in card.data.experts_per_layer.items()} == {i: len(ids) for i, ids in KEEP.items()}


def test_push_then_inspect_the_hub_repo(hand_pruned, hub_server, tmp_path, monkeypatch, capsys):
    """`push REPO_ID DIR` through the real client to the local Hub; `inspect REPO_ID` reads it back from there."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    repo = f"{hub_server.user}/tiny-cli"
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    assert main(["push", repo, str(hand_pruned), "--json"]) == 0
    pushed = json.loads(capsys.readouterr().out)
    assert pushed["repo_id"] == repo and pushed["commit_url"]
    assert hub_server.token not in pushed["commit_url"]
    assert main(["inspect", str(hand_pruned), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["inspect", repo, "--json"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["source"] == repo
    assert {k: v for k, v in remote.items() if k != "source"} == {k: v for k, v in local.items() if k != "source"}


def test_push_without_token_is_a_message(hand_pruned, hub_server, capsys):
    assert main(["push", f"{hub_server.user}/x", str(hand_pruned)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diep-hub push: error: ") and "Traceback" not in err and "token" in err.lower()


def test_push_in_the_old_order_is_answered_with_the_command_in_the_new_one(hand_pruned, hub_server, capsys):
    """`push DIR REPO_ID` (before `hf upload`'s order): refused before any request, with the corrected command,
    which parses back to the same folder, repo and options (the token is never echoed)."""
    import shlex

    argv = ["push", str(hand_pruned), "me/tiny-diep", "--private", "--commit-message", "DiEP 50%", "--token", "hf_x"]
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    command = f"diep-hub push me/tiny-diep {shlex.quote(str(hand_pruned))} --private --commit-message 'DiEP 50%'"
    assert err == (f"diep-hub push: error: push takes REPO_ID PATH, in the order of `hf upload`; {str(hand_pruned)!r} "
                   f"is a folder and 'me/tiny-diep' is not, so the two are swapped: run `{command}`")
    fixed = build_parser().parse_args(shlex.split(command)[1:])
    assert (fixed.repo_id, fixed.path, fixed.private, fixed.commit_message) == (
        "me/tiny-diep", str(hand_pruned), True, "DiEP 50%")
    assert hub_server.requests == [] and "hf_x" not in err


def test_push_to_a_revision_with_the_token_flag(hand_pruned, hub_server, tmp_path, monkeypatch, capsys):
    """`--revision BRANCH` as `hf upload` has it: a missing branch is created from main and the commit lands on it,
    main stays where it was; `--token` authenticates without HF_TOKEN (with a warning) and is never printed."""
    from huggingface_hub import HfApi, constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    branches = []

    def create_branch(self, repo_id, *, branch, token=None, exist_ok=False, **kwargs):
        # the fake Hub has no branch endpoint: make the ref as the Hub does, from main
        assert token == hub_server.token and exist_ok
        branches.append(branch)
        refs = hub_server.repos[repo_id].refs
        refs.setdefault(branch, refs["main"])

    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    repo = f"{hub_server.user}/tiny-branch"
    token = ["--token", hub_server.token]
    assert main(["push", repo, str(hand_pruned), "--json", *token]) == 0
    main_head = hub_server.repos[repo].refs["main"]
    folder = tmp_path / "edited"
    shutil.copytree(hand_pruned, folder)
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nAn experiment.\n")
    capsys.readouterr()
    argv = ["push", repo, str(folder), "--revision", "experiments", "--commit-message", "Try it", "--json", *token]
    assert main(argv) == 0
    captured = capsys.readouterr()
    pushed = json.loads(captured.out)
    refs = hub_server.repos[repo].refs
    assert branches == ["experiments"] and refs["main"] == main_head and refs["experiments"] != main_head
    assert pushed["revision"] == "experiments" and pushed["commit_url"].endswith(refs["experiments"])
    commit = hub_server.repos[repo].commits[refs["experiments"]]
    assert commit.title == "Try it" and commit.parent == main_head
    assert "--token leaves your token in your shell history" in captured.err
    assert hub_server.token not in captured.out + captured.err


@pytest.mark.parametrize(("flag", "level"), [("-q", "ERROR"), ("-v", "INFO"), ("-vv", "DEBUG")])
def test_verbosity_flags_set_transformers_and_huggingface_hub_too(flag, level, monkeypatch):
    import logging

    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    try:
        assert main([flag, "env", "--json"]) == 0
        assert hub_logging.get_verbosity() == transformers_logging.get_verbosity() == getattr(logging, level)
    finally:
        hub_logging.set_verbosity_warning()
        transformers_logging.set_verbosity_warning()


def test_reproduce_needs_a_recorded_recipe(hand_pruned, capsys):
    assert main(["reproduce", str(hand_pruned)]) == 2
    assert "no recipe.yaml -> only checkpoints made by `diep-hub run` can be reproduced" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the whole tiny recipe (slow)
RELOAD_SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save(logits, sys.argv[3])
print(json.dumps({"diep_hub_imported": any(m.startswith("diep_hub") for m in sys.modules),
                  "class": type(model).__name__}))
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`diep-hub run recipes/tiny.yaml --output DIR --json` in a fresh process, once for the module."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    proc = _cli("run", str(TINY), "--output", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)


@pytest.mark.slow
def test_run_tiny_writes_a_checkpoint_that_reloads_with_remote_code(tiny_run, tmp_path):
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
    logits_file = tmp_path / "logits.pt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(out), json.dumps(ids), str(logits_file)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["diep_hub_imported"] is False
    remote = torch.load(logits_file)
    # ... and gives the logits of the same checkpoint loaded through diep_hub's registered classes.
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
    proc = _cli("inspect", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["layers"] == summary["experts"]
    assert (info["experts_kept"], info["experts_original"], info["sparsity"]) == (16, 32, 0.5)
    assert info["method"] == "diep" and info["has_recipe"] is True


@pytest.mark.slow
def test_reproduce_matches_the_run(tiny_run):
    out, _ = tiny_run
    proc = _cli("reproduce", str(out), "--json")
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
    proc = _cli("reproduce", str(altered), "--no-eval", "--json")
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
    proc = _cli("reproduce", str(altered), "--no-eval")
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
    proc = _cli("eval", str(out), "--tasks", "diep_tiny_arith")
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
    proc = _cli("eval", str(folder), "--tasks", "diep_tiny_arith", "--base", "diep-hub/tiny-mixtral", "--save")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((folder / "evaluation.json").read_text())
    assert saved == json.loads(proc.stdout)
    metric = lambda side: side["lm_eval"]["tasks"]["diep_tiny_arith"]["metrics"]["acc"]  # noqa: E731
    # the same numbers the run measured, for both models, and retention = pruned / base
    assert metric(saved["pruned"]) == metric(summary["evaluation"]["pruned"])
    assert metric(saved["base"]) == metric(summary["evaluation"]["base"])
    retention = saved["comparison"]["tasks"]["diep_tiny_arith"]["metrics"]["acc"]["retention"]
    assert retention == pytest.approx(metric(saved["pruned"]) / metric(saved["base"]))
    assert _cli("card", str(folder)).returncode == 0
    card = (folder / "README.md").read_text()
    assert f"{100 * retention:.2f}%" in card


def test_eval_save_needs_a_checkpoint_folder(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere"), "--tasks", "x", "--save"]) == EXIT_ERROR
    message = capsys.readouterr().err
    assert "--save writes evaluation.json into a checkpoint folder" in message and "nowhere" in message


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
    proc = _cli("run", str(recipe_file), "--output", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4 and "auto_map" not in config
    assert not (out / "modeling_diep.py").exists()
    card = (out / "README.md").read_text()
    assert "saved in the stock `mixtral` architecture (no remote" in card
    assert "trust_remote_code=True" not in card and "Engines that assume one expert count" not in card
    proc = _cli("reproduce", str(out), "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kept = json.loads(proc.stdout)["checks"]["kept_experts"]
    assert kept == {"match": True, "differences": []}


def test_every_help_example_parses_with_the_flags_it_shows():
    """Each `diep-hub ...` example of every epilog (main and subcommands) is accepted by the parser as written: an
    example naming a flag that does not exist (`eval ... --json` once) fails here."""
    import argparse
    import shlex

    from diep_hub.cli.parser import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    texts = [parser.epilog or ""] + [p.epilog or "" for p in sub.choices.values()]
    examples = []
    for text in texts:
        for line in text.replace("\\\n", " ").splitlines():  # join shell continuation lines
            for command in line.split("&&"):
                command = command.split("#")[0].strip()
                if command.startswith("diep-hub ") and "<" not in command and "|" not in command:
                    examples.append(shlex.split(command)[1:])
    assert len(examples) >= 15
    for argv in examples:
        if argv in (["--version"], ["--help"]):
            continue
        namespace = parser.parse_args(argv)  # exits (SystemExit) on an unknown flag or a bad value
        assert callable(namespace.func), argv
    commands = {argv[0] for argv in examples if not argv[0].startswith("-")}
    assert {"run", "prune", "eval", "card", "push", "inspect", "reproduce", "env"} <= commands


# ------------------------------------------------------------------------------------------------ run summary
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
