"""diep-hub refuses bad input with a one-line message before any work: a missing or invalid recipe, a folder that
is not a checkpoint, an output folder in use, a push without a repo id or with a rejected token."""

from __future__ import annotations

import pytest
import yaml

from diep_hub.cli import EXIT_ERROR, main
from tests.helpers.console import ROOT, run_console

TINY = ROOT / "recipes" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("private_cache")


def test_missing_recipe_file_is_a_message_not_a_traceback(tmp_path):
    proc = run_console("run", str(tmp_path / "nope.yaml"))
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


def test_eval_save_needs_a_checkpoint_folder(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere"), "--tasks", "x", "--save"]) == EXIT_ERROR
    message = capsys.readouterr().err
    assert "--save writes evaluation.json into a checkpoint folder" in message and "nowhere" in message
