"""What push allows around its refusals: the token scan across chunk borders, symlinks inside the folder followed,
pickles uploaded with allow_pickle (a bool), a pull request with nothing changed opened nowhere and said so, and the
CLI's flags and one-line errors for the same cases. Against the fake Hub of tests/helpers/hub_server.py.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from diep_hub.checkpoint import upload as upload_module
from diep_hub.hub import PushError, push
from tests.helpers import push_checkpoint
from tests.helpers.fault_catalogue import run_cli
from tests.helpers.push_checkpoint import REPO

template, folder = push_checkpoint.template, push_checkpoint.folder  # fixtures (tests/helpers/push_checkpoint.py)


@pytest.mark.parametrize("chunk", [4, 7, 9, 16])
def test_token_scan_finds_the_token_at_every_offset_around_chunk_borders(chunk, tmp_path, monkeypatch):
    """The overlap of len(token) - 1 bytes: with chunks shorter or longer than the token, a token starting
    anywhere is found, and one byte short of it is not."""
    monkeypatch.setattr(upload_module, "_SCAN_CHUNK", chunk)
    needle = b"hf_secret"
    for start in range(0, 30):
        path = tmp_path / f"f{start}"
        path.write_bytes(b"x" * start + needle + b"y" * 5)
        assert upload_module._file_contains(path, needle), start
        path.write_bytes(b"x" * start + needle[:-1] + b"y" * 5)
        assert not upload_module._file_contains(path, needle), start


def test_symlink_inside_the_folder_is_followed(hub_server, folder):
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text("hello\n")
    os.symlink("notes/a.txt", folder / "NOTES.txt")
    push(folder, REPO, token=hub_server.token)
    assert hub_server.file(REPO, "NOTES.txt") == b"hello\n" == hub_server.file(REPO, "notes/a.txt")


def test_allow_pickle_uploads_the_pickles(hub_server, folder, caplog):
    torch.save({"step": 3}, folder / "optimizer.pt")
    with caplog.at_level(logging.WARNING, logger="diep_hub.checkpoint.upload"):
        push(folder, REPO, token=hub_server.token, allow_pickle=True)
    assert hub_server.file(REPO, "optimizer.pt") == (folder / "optimizer.pt").read_bytes()
    assert "uploading pickle files ['optimizer.pt'] (allow_pickle=True)" in caplog.text


def test_only_pickle_weights_upload_with_allow_pickle(hub_server, folder):
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    push(folder, REPO, token=hub_server.token, allow_pickle=True)
    assert "pytorch_model.bin" in hub_server.repos[REPO].history()[0].files
    assert "model.safetensors" not in hub_server.repos[REPO].history()[0].files


def test_allow_pickle_must_be_a_bool(hub_server, folder):
    with pytest.raises(PushError, match="allow_pickle='yes' must be True or False"):
        push(folder, REPO, token=hub_server.token, allow_pickle="yes")
    assert hub_server.requests == []


def test_pull_request_with_nothing_changed_opens_none_and_says_so(hub_server, folder, caplog):
    first = push(folder, REPO, token=hub_server.token)
    with caplog.at_level(logging.WARNING, logger="diep_hub.hub"):
        info = push(folder, REPO, token=hub_server.token, create_pr=True)
    repo = hub_server.repos[REPO]
    assert info.pr_url is None and info.oid == first.oid
    assert repo.prs == [] and not any(ref.startswith("refs/pr/") for ref in repo.refs)
    assert len(repo.history()) == 2
    assert f"no pull request was opened on {REPO}: nothing changed, every file is identical to main" in caplog.text

    # The control: a change opens a pull request and leaves main alone.
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nEdited.\n")
    info = push(folder, REPO, token=hub_server.token, create_pr=True)
    assert info.pr_url == f"{hub_server.endpoint}/{REPO}/discussions/1"
    assert repo.refs["main"] == first.oid and repo.refs["refs/pr/1"] == info.oid


def test_cli_pull_request_with_nothing_changed_warns_on_stderr(hub_server, folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    assert run_cli(["push", REPO, str(folder)], monkeypatch).code == 0
    result = run_cli(["push", REPO, str(folder), "--create-pr"], monkeypatch)
    assert result.code == 0, result.stderr
    assert "no pull request was opened" in result.stderr and "nothing changed" in result.stderr
    assert result.stdout.startswith(f"no pull request opened on {REPO}: nothing changed"), result.stdout
    assert hub_server.repos[REPO].prs == []
    assert hub_server.token not in result.stdout + result.stderr


def test_cli_push_refuses_pickles_unless_allowed(hub_server, folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    refused = run_cli(["push", REPO, str(folder)], monkeypatch)
    # the flag to use, not the Python keyword of the API's message
    assert refused.code == 2 and "pass --allow-pickle to upload them anyway" in refused.stderr
    assert "allow_pickle" not in refused.stderr
    assert REPO not in hub_server.repos
    allowed = run_cli(["push", REPO, str(folder), "--allow-pickle"], monkeypatch)
    assert allowed.code == 0, allowed.stderr
    assert "pytorch_model.bin" in hub_server.repos[REPO].history()[0].files


def test_cli_maps_a_dropped_commit_to_one_error_line(hub_server, folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    hub_server.faults["commit"] = "drop"
    result = run_cli(["push", REPO, str(folder)], monkeypatch)
    assert result.code == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("diep-hub push: error: the commit to")
    assert "retry: the push is idempotent" in errors[0]
    assert hub_server.token not in result.stderr
