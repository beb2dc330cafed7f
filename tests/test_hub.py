"""Publishing through the real huggingface_hub client against the in-process fake Hub (tests/helpers/hub_server.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard

import diep_hub
from diep_hub.card import build_model_card, write_card
from diep_hub.errors import ConfigError
from diep_hub.hub import PushError, push
from tests.helpers.tiny_models import sample_input_ids, tiny_model
from tests.helpers.word_tokenizer import tiny_tokenizer

KEEP = {0: [0, 1, 2], 1: [1, 2, 5, 6], 2: [0, 1], 3: [2, 3, 7]}
REPO = "tester/tiny-mixtral-diep"



@pytest.fixture
def pruned(tmp_path):
    """A pruned tiny Mixtral saved with tokenizer, report and card; returns (model, folder)."""
    model = diep_hub.prune_experts(tiny_model("mixtral"), KEEP)
    folder = tmp_path / "ckpt"
    report = {"method": "frequency", "sparsity": 0.5, "selection": "global", "seed": 3}
    diep_hub.save_pruned(model, folder, tokenizer=tiny_tokenizer(), extra_files={"pruning_report.json": report})
    write_card(folder, build_model_card(folder, base_model="mistralai/Mixtral-8x7B-v0.1", repo_id=REPO,
                                       license="apache-2.0"))
    return model, folder


def _history(server, repo=REPO, ref="main"):
    return server.repos[repo].history(ref)


def test_push_then_from_pretrained_through_endpoint_gives_same_logits(hub_server, pruned, tmp_path):
    model, folder = pruned
    info = push(folder, REPO, token=hub_server.token)

    # One commit with every file of the folder, byte for byte.
    history = _history(hub_server)
    assert len(history) == 2  # repo creation + our single upload commit
    assert info.oid == history[0].oid
    local = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert set(history[0].files) == local
    for rel in local:
        assert hub_server.file(REPO, rel) == (folder / rel).read_bytes()
    assert history[0].title.startswith("Upload diep_mixtral checkpoint: frequency expert pruning, 12/32")

    ids = sample_input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "expected": expected}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        assert "diep_hub" not in sys.modules
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({REPO!r}, trust_remote_code=True)
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            diff = (model(ref["ids"]).logits - ref["expected"]).abs().max().item()
        assert "diep_hub" not in sys.modules
        print("RESULT", type(model).__name__, model.config.num_experts_per_layer, diff)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub_server.endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH="", NO_PROXY="127.0.0.1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    _, cls, counts, diff = line.split(" ", 3)
    cls_name, rest = cls, counts + " " + diff
    assert cls_name == "DiepMixtralForCausalLM"
    assert json.loads(rest.rsplit(" ", 1)[0]) == [3, 4, 2, 3]
    assert float(rest.rsplit(" ", 1)[1]) == 0.0
    # The downloads really came through the fake Hub.
    assert ("GET", f"/{REPO}/resolve/main/model.safetensors") in hub_server.requests or any(
        m == "GET" and p.startswith(f"/{REPO}/resolve/") and p.endswith(".safetensors") for m, p in hub_server.requests
    )


def test_card_on_the_hub_parses_with_expected_data(hub_server, pruned):
    _, folder = pruned
    push(folder, REPO, token=hub_server.token)
    card = ModelCard(hub_server.file(REPO, "README.md").decode())
    assert card.data.base_model == "mistralai/Mixtral-8x7B-v0.1"
    assert card.data.to_dict()["experts_per_layer"] == {str(k): len(v) for k, v in KEEP.items()}
    assert "No evaluation results" in card.text
    info = HfApi(endpoint=hub_server.endpoint).model_info(REPO, token=hub_server.token)
    assert info.card_data["base_model"] == "mistralai/Mixtral-8x7B-v0.1"
    assert "assets/experts_per_layer.png" in {s.rfilename for s in info.siblings}


def test_repush_same_folder_makes_no_new_commit_and_changes_make_one(hub_server, pruned):
    _, folder = pruned
    first = push(folder, REPO, token=hub_server.token)
    second = push(folder, REPO, token=hub_server.token)
    assert second.oid == first.oid
    assert len(_history(hub_server)) == 2
    stored = len(list(hub_server.blobs.iterdir()))

    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nMore notes.\n")
    third = push(folder, REPO, token=hub_server.token, commit_message="Update the card")
    history = _history(hub_server)
    assert len(history) == 3 and third.oid == history[0].oid and history[0].title == "Update the card"
    changed = {p for p in history[0].files if history[0].files[p] != history[1].files.get(p)}
    assert changed == {"README.md"}
    assert len(list(hub_server.blobs.iterdir())) == stored + 1  # only the new README was stored


def test_stale_weight_shards_are_deleted_in_the_same_commit(hub_server, pruned):
    _, folder = pruned
    shutil.copy(folder / "model.safetensors", folder / "model-old.safetensors")
    push(folder, REPO, token=hub_server.token)
    assert "model-old.safetensors" in _history(hub_server)[0].files
    (folder / "model-old.safetensors").unlink()
    push(folder, REPO, token=hub_server.token)
    head = _history(hub_server)[0]
    assert "model-old.safetensors" not in head.files and "model.safetensors" in head.files
    assert len(_history(hub_server)) == 3


def test_pull_request_and_private_repo(hub_server, pruned):
    _, folder = pruned
    info = push(folder, REPO, token=hub_server.token, private=True, create_pr=True, commit_message="DiEP 50%")
    repo = hub_server.repos[REPO]
    assert repo.private is True
    assert info.pr_url == f"{hub_server.endpoint}/{REPO}/discussions/1"
    assert repo.refs["refs/pr/1"] == info.oid
    assert repo.history("main")[0].files == {}  # main untouched: the upload waits in the PR
    assert repo.commits[info.oid].title == "DiEP 50%"
    api = HfApi(endpoint=hub_server.endpoint)
    with pytest.raises(Exception) as anonymous:
        api.model_info(REPO, token=False)
    assert "401" in str(anonymous.value) or "Repository Not Found" in str(anonymous.value)


def test_private_push_to_an_existing_public_repo_warns(hub_server, pruned, caplog):
    _, folder = pruned
    push(folder, REPO, token=hub_server.token)
    assert hub_server.repos[REPO].private is False
    with caplog.at_level(logging.WARNING, logger="diep_hub.hub"):
        push(folder, REPO, token=hub_server.token, private=True, commit_message="again")
    assert hub_server.repos[REPO].private is False  # visibility of an existing repo is never changed behind your back
    assert f"{REPO} already exists and is public: private=True only applies to a new repository" in caplog.text
    assert hub_server.token not in caplog.text


def test_push_a_model_object_saves_and_uploads_everything(hub_server):
    model = diep_hub.prune_experts(tiny_model("qwen3_moe"), {0: [0, 1, 2, 3], 1: [4, 5], 2: [0, 7], 3: [1, 2, 3]})
    info = push(model, "tester/qwen3-direct", token=hub_server.token, tokenizer=tiny_tokenizer())
    files = set(_history(hub_server, "tester/qwen3-direct")[0].files)
    assert {"config.json", "model.safetensors", "configuration_diep.py", "modeling_diep.py", "README.md",
            "tokenizer.json", "assets/experts_per_layer.png"} <= files
    config = json.loads(hub_server.file("tester/qwen3-direct", "config.json"))
    assert [n for n in config["num_experts_per_layer"]] == [4, 2, 2, 3]
    assert info.oid == _history(hub_server, "tester/qwen3-direct")[0].oid


def _all_text(caplog, exc: BaseException | None) -> str:
    return "\n".join(r.getMessage() for r in caplog.records) + "\n" + caplog.text + "\n" + str(exc or "")


def test_missing_token_fails_before_any_request(hub_server, pruned, caplog):
    _, folder = pruned
    with pytest.raises(PushError, match="no Hugging Face token found"):
        push(folder, REPO)
    assert hub_server.requests == []


def test_invalid_token_fails_before_upload_and_is_never_shown(hub_server, pruned, caplog):
    _, folder = pruned
    secret = "hf_NotARealToken_s3cr3t_value_42"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PushError, match="rejected the token") as err:
        push(folder, REPO, token=secret)
    assert [p for _, p in hub_server.requests] == ["/api/whoami-v2"]
    assert REPO not in hub_server.repos
    assert secret not in _all_text(caplog, err.value)
    assert not any(secret.encode() in p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_read_only_token_is_refused_before_upload(hub_server, pruned, caplog):
    _, folder = pruned
    with pytest.raises(PushError, match="write access"):
        push(folder, REPO, token=hub_server.read_token)
    assert REPO not in hub_server.repos


def test_token_from_environment_is_used_and_never_logged_or_stored(hub_server, pruned, caplog, monkeypatch):
    _, folder = pruned
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    caplog.set_level(logging.DEBUG)
    info = push(folder, REPO)
    assert info.oid == _history(hub_server)[0].oid
    logged = _all_text(caplog, None)
    assert "pushing" in logged and f"as {hub_server.user}" in logged  # the logs were captured: the check below can fail
    assert hub_server.token not in logged
    assert not any(hub_server.token.encode() in blob for blob in hub_server.all_stored_bytes())
    assert not any(hub_server.token.encode() in p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_folder_containing_the_token_is_refused(hub_server, pruned):
    _, folder = pruned
    (folder / "notes.txt").write_text(f"my token is {hub_server.token}\n")
    with pytest.raises(PushError, match="notes.txt contains your Hugging Face token") as err:
        push(folder, REPO, token=hub_server.token)
    assert hub_server.token not in str(err.value)
    assert REPO not in hub_server.repos


@pytest.mark.parametrize(
    "repo_id", ["no-namespace", "a/b/c", "user/bad name", "user/x--y", "", "user/x.git", "user/-x"]
)
def test_bad_repo_id_is_refused(repo_id, hub_server, pruned):
    with pytest.raises(PushError, match="not a valid Hub model id"):
        push(pruned[1], repo_id, token=hub_server.token)
    assert hub_server.requests == []


@pytest.mark.parametrize(
    ("repo_id", "reason"),
    [("my-user/Mixtral-8x7B-DiEP-50", None), ("a/b", None), ("no-namespace", "exactly one '/'"),
     ("a/b/c", "exactly one '/'"), ("user/x--y", "Cannot have -- or .."), ("user/x.git", "cannot end by '.git'"),
     ("user/bad name", "alphanumeric chars"), (None, "a string is needed, not NoneType")],
)
def test_one_repo_id_rule_for_push_recipes_and_inspect(repo_id, reason, tmp_path, monkeypatch):
    """push, publish.repo_id in a recipe and inspect's Hub source share huggingface_hub's rule (one helper)."""
    from diep_hub.checkpoint.inspect import local_folder
    from diep_hub.hub import repo_id_problem
    from diep_hub.recipe import Recipe, RecipeError

    problem = repo_id_problem(repo_id)
    if reason is None:
        assert problem is None
        assert Recipe.from_dict({"model": {"id": "a/b"}, "publish": {"repo_id": repo_id}}).publish.repo_id == repo_id
        return
    assert reason in problem
    if repo_id is None:
        return
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"model": {"id": "a/b"}, "publish": {"repo_id": repo_id}})
    assert info.value.problems == [f"publish.repo_id: {repo_id!r} -> not a valid Hub model id ({problem}); use "
                                   "'namespace/name' (letters, digits, '-', '_', '.'; no '--' or '..'), "
                                   "e.g. 'my-user/Mixtral-8x7B-DiEP-50'"]
    monkeypatch.chdir(tmp_path)  # a relative repo id names no folder here
    with pytest.raises(ConfigError, match="is neither a folder nor a Hub repo id -> give DIR or namespace/name"):
        local_folder(repo_id)


def test_bad_folders_are_refused(hub_server, tmp_path, pruned):
    with pytest.raises(PushError, match="is not a folder"):
        push(tmp_path / "missing", REPO, token=hub_server.token)
    _, folder = pruned
    (folder / "modeling_diep.py").unlink()
    with pytest.raises(PushError, match="modeling_diep.py"):
        push(folder, REPO, token=hub_server.token)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PushError, match="no config.json"):
        push(empty, REPO, token=hub_server.token)
    assert hub_server.requests == []


def test_wrong_namespace_is_a_clear_error(hub_server, pruned):
    with pytest.raises(PushError, match="could not create or read someone-else/x"):
        push(pruned[1], "someone-else/x", token=hub_server.token)


def test_push_to_an_existing_branch_leaves_main_alone(hub_server, pruned):
    """``revision=`` commits to that branch (its files are what "unchanged" is compared with); main stays."""
    _, folder = pruned
    first = push(folder, REPO, token=hub_server.token)
    repo = hub_server.repos[REPO]
    repo.refs["dev"] = first.oid  # a branch made on the Hub
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nOn dev.\n")
    info = push(folder, REPO, token=hub_server.token, revision="dev", commit_message="dev card")
    assert repo.refs["main"] == first.oid and repo.refs["dev"] == info.oid != first.oid
    assert repo.commits[info.oid].title == "dev card" and repo.commits[info.oid].parent == first.oid
    again = push(folder, REPO, token=hub_server.token, revision="dev")  # identical to dev: no new commit
    assert again.oid == info.oid and len(repo.history("dev")) == len(_history(hub_server)) + 1


def test_pull_request_against_a_missing_branch_is_refused_before_upload(hub_server, pruned):
    _, folder = pruned
    first = push(folder, REPO, token=hub_server.token)
    with pytest.raises(PushError, match=r"has no branch 'nope': a pull request needs an existing branch") as info:
        push(folder, REPO, token=hub_server.token, revision="nope", create_pr=True)
    assert "nothing was uploaded" in str(info.value)
    repo = hub_server.repos[REPO]
    assert repo.prs == [] and set(repo.refs) == {"main"} and repo.refs["main"] == first.oid
    with pytest.raises(PushError, match="revision='' must be a non-empty branch name"):
        push(folder, REPO, token=hub_server.token, revision="")


def test_cli_push_uses_the_environment_token_and_maps_errors(hub_server, pruned, monkeypatch, capsys):
    from diep_hub.cli import main

    _, folder = pruned
    assert main(["push", REPO, str(folder)]) == 2  # no token anywhere
    err = capsys.readouterr().err
    assert "no Hugging Face token found" in err and hub_server.requests == []
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    assert main(["push", REPO, str(folder), "--commit-message", "CLI upload"]) == 0
    out = capsys.readouterr()
    assert hub_server.token not in out.out + out.err
    head = _history(hub_server)[0]
    assert head.title == "CLI upload" and "model.safetensors" in head.files


def test_cli_push_follows_the_folder_recipe_unless_told_otherwise(hub_server, pruned, monkeypatch, tmp_path):
    """A folder written by `diep-hub run` carries its recipe: its publish settings are the push defaults."""
    from diep_hub.cli import main

    _, folder = pruned
    copy = tmp_path / "with-recipe"
    shutil.copytree(folder, copy)
    publish = {"private": True, "create_pr": True, "commit_message": "From the recipe"}
    (copy / "recipe.yaml").write_text(yaml.safe_dump({"model": {"id": "org/m"}, "publish": publish}))
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    assert main(["push", "tester/from-recipe", str(copy)]) == 0
    repo = hub_server.repos["tester/from-recipe"]
    assert repo.private is True and "refs/pr/1" in repo.refs
    assert repo.commits[repo.refs["refs/pr/1"]].title == "From the recipe"
    # flags win over the recipe
    assert main(["push", "tester/flags-win", str(copy), "--no-private", "--no-create-pr", "--message", "x"]) == 0
    repo = hub_server.repos["tester/flags-win"]
    assert repo.private is False and "refs/pr/1" not in repo.refs and repo.history("main")[0].title == "x"


def test_offline_mode_is_a_clear_error(pruned, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE is set"):
        push(pruned[1], REPO, token="hf_whatever")


def test_unreachable_hub_is_a_clear_error(pruned, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    secret = "hf_unreachable_s3cr3t"
    with pytest.raises(PushError, match="could not reach the Hub at http://127.0.0.1:9") as err:
        push(pruned[1], REPO, token=secret)
    assert secret not in str(err.value)
