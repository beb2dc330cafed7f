"""diep-hub on a checkpoint folder: inspect, card, push (orders, revisions, tokens), reproduce, verbosity flags;
on a hand-pruned tiny checkpoint (explicit keep map, report and card)."""

from __future__ import annotations

import json
import shutil

import pytest

from diep_hub import prune_experts, save_pruned
from diep_hub.cli import EXIT_ERROR, build_parser, main
from diep_hub.tiny import build_tiny_model

KEEP = {0: [0, 1, 2, 3, 4, 5, 6], 1: [1, 3, 5, 7], 2: [2, 6], 3: [0, 1, 2, 3, 4]}

pytestmark = pytest.mark.usefixtures("private_cache")


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
