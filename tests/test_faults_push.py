"""Fault catalogue of ``push``: what it refuses before sending a byte, and how a failing Hub is reported.

Every row runs against the in-process Hub of tests/helpers/hub_server.py (real huggingface_hub client) and checks three
things: the error class and words (file names, "retry", "idempotent", what is on the Hub), that the token is in no
message or diep_hub log line, and what the emulated Hub holds afterwards (nothing at all when refused).

A row's ``setup`` takes a dict ``{"tmp_path", "hub", "monkeypatch", "folder"}`` (``folder``: a fresh copy of a
saved pruned checkpoint) and returns the context; the test binds it to the fake Hub before handing the row to
:func:`fault_catalogue.check_fault`, whose ``setup(tmp_path)`` contract it then follows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from diep_hub.errors import CorruptFileError
from diep_hub.hub import PushError, push
from tests.helpers import push_checkpoint
from tests.helpers.fault_catalogue import Fault, check_fault, ids
from tests.helpers.push_checkpoint import REPO

MiB = 1024 * 1024
template, folder = push_checkpoint.template, push_checkpoint.folder  # fixtures (tests/helpers/push_checkpoint.py)


# --- setups ------------------------------------------------------------------------------------------------------


def _plain(base):
    return base


def _no_backoff_sleep(base):
    """huggingface_hub retries preupload and tree listings with exponential backoff (1 s, 2 s, 4 s...): no sleeps."""
    from huggingface_hub.utils import _http

    base["monkeypatch"].setattr(_http, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    return base


def _fault(endpoint: str, kind: str, *, retried: bool = False):
    def setup(base):
        base["hub"].faults[endpoint] = kind
        return _no_backoff_sleep(base) if retried else base

    return setup


def _pushed_before(then=None):
    """A first successful push; the row's fault (``then``) is set up afterwards, on an edited folder."""

    def setup(base):
        first = push(base["folder"], REPO, token=base["hub"].token)
        readme = base["folder"] / "README.md"
        readme.write_text(readme.read_text() + "\nA second version of the card.\n")
        base["first_oid"] = first.oid
        return then(base) if then else base

    return setup


def _empty_repo_before(then):
    """The repo exists (made by an earlier, separate create_repo) but has no file yet."""

    def setup(base):
        HfApi(endpoint=base["hub"].endpoint).create_repo(REPO, token=base["hub"].token)
        base["hub"].requests.clear()
        return then(base)

    return setup


def _big_log_with_token_at_the_end(base):
    with open(base["folder"] / "train.log", "wb") as fh:
        line = b"step 1 loss 1.2345 lr 1e-4 tokens/s 12345\n"
        fh.write(line * (12 * MiB // len(line) + 1))
        fh.write(b"HF_TOKEN=" + base["hub"].token.encode() + b"\n")
    assert (base["folder"] / "train.log").stat().st_size > 12 * MiB
    return base


def _token_across_a_chunk_boundary(base):
    token = base["hub"].token.encode()
    cut = len(token) // 2
    data = bytearray(b"\0" * (3 * MiB))
    data[MiB - cut: MiB - cut + len(token)] = token  # half in chunk 1, half in chunk 2
    (base["folder"] / "data").mkdir()
    (base["folder"] / "data" / "blob.dat").write_bytes(bytes(data))
    return base


def _token_in_safetensors_metadata(base):
    path = base["folder"] / "model.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt", "note": f"pushed with {base['hub'].token}"})
    return base


def _link_outside(base):
    secret = base["tmp_path"] / "outside" / "secrets.txt"
    secret.parent.mkdir()
    secret.write_text("not part of the checkpoint\n")
    os.symlink(secret, base["folder"] / "notes.txt")
    base["target"] = str(secret)
    return base


def _link_outside_relative(base):
    (base["tmp_path"] / "elsewhere.json").write_text("{}")
    os.symlink("../elsewhere.json", base["folder"] / "generation_extra.json")
    return base


def _dangling_link(base):
    os.symlink("gone.safetensors", base["folder"] / "extra.safetensors")
    return base


def _link_to_directory(base):
    (base["folder"] / "assets-copy").symlink_to("assets", target_is_directory=True)
    return base


def _stray_pickles(base):
    torch.save({"w": torch.zeros(2)}, base["folder"] / "pytorch_model.bin")
    torch.save({"step": 3}, base["folder"] / "optimizer.pt")
    return base


def _only_pickle_weights(base):
    folder = base["folder"]
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return base


def _corrupt(name: str, text: str):
    def setup(base):
        (base["folder"] / name).write_text(text)
        return base

    return setup


# --- calls ---------------------------------------------------------------------------------------------------------


def _push(**kwargs):
    return lambda ctx: push(ctx["folder"], REPO, token=ctx["hub"].token, **kwargs)


# --- checks of what is on the Hub afterwards ------------------------------------------------------------------------


def _nothing_sent(ctx):
    """Refused before any request: not even the token was checked, no repo exists."""
    assert ctx["hub"].requests == []
    assert REPO not in ctx["hub"].repos


def _nothing_uploaded(ctx):
    """Refused after the token check: no repo, no commit, no preupload, no stored blob."""
    hub = ctx["hub"]
    assert REPO not in hub.repos
    assert [p for _, p in hub.requests] == ["/api/whoami-v2"]
    assert list(hub.blobs.iterdir()) == []


def _no_repo(ctx):
    assert REPO not in ctx["hub"].repos


def _created_and_empty(ctx):
    """The repo exists (created by the push) with only its initial commit and no file."""
    repo = ctx["hub"].repos[REPO]
    assert [c.title for c in repo.history()] == ["initial commit"]
    assert repo.history()[0].files == {}
    assert repo.prs == []


def _empty_and_never_recreated(ctx):
    """The existing repo was used as it is: no create request from the push, still no file."""
    _created_and_empty(ctx)
    assert ("POST", "/api/repos/create") not in ctx["hub"].requests


def _unchanged(ctx):
    repo = ctx["hub"].repos[REPO]
    assert repo.refs["main"] == ctx["first_oid"]
    assert len(repo.history()) == 2
    assert "A second version" not in ctx["hub"].file(REPO, "README.md").decode()


def _hit(endpoint: str, kind: str, then=None):
    def check(ctx):
        assert (endpoint, kind) in ctx["hub"].fault_hits
        if then:
            then(ctx)

    return check


def _landed_and_retry_is_a_no_op(ctx):
    """"drop-after": the commit was made, its answer lost. A re-run makes no second commit."""
    hub = ctx["hub"]
    repo = hub.repos[REPO]
    history = repo.history()
    assert len(history) == 2 and "model.safetensors" in history[0].files
    hub.faults.clear()
    again = push(ctx["folder"], REPO, token=hub.token)
    assert again.oid == history[0].oid and len(repo.history()) == 2


def _retry_succeeds(then):
    """After the fault is gone, the same push goes through: one commit with every file."""

    def check(ctx):
        then(ctx)
        hub = ctx["hub"]
        hub.faults.clear()
        info = push(ctx["folder"], REPO, token=hub.token)
        head = hub.repos[REPO].history()[0]
        assert info.oid == head.oid
        assert hub.file(REPO, "README.md") == (ctx["folder"] / "README.md").read_bytes()

    return check


RETRY = ("retry", "idempotent")

PUSH_FAULTS = [
    # --- the token is in something the push would send
    Fault("token-at-end-of-12MiB-log", _big_log_with_token_at_the_end, _push(), PushError,
          ["train.log", "contains your Hugging Face token", "nothing was uploaded"], _nothing_uploaded),
    Fault("token-split-across-scan-chunks", _token_across_a_chunk_boundary, _push(), PushError,
          ["data/blob.dat", "contains your Hugging Face token"], _nothing_uploaded),
    Fault("token-in-safetensors-metadata", _token_in_safetensors_metadata, _push(), PushError,
          ["model.safetensors", "contains your Hugging Face token"], _nothing_uploaded),
    Fault("token-in-commit-message", _plain,
          lambda ctx: push(ctx["folder"], REPO, token=ctx["hub"].token, commit_message=f"by {ctx['hub'].token}"),
          PushError, ["commit message contains your Hugging Face token"], _nothing_uploaded),
    # --- symlinks
    Fault("symlink-to-a-file-outside", _link_outside, _push(), PushError,
          ["notes.txt", "secrets.txt", "outside the folder"], _nothing_sent),
    Fault("relative-symlink-out-of-the-folder", _link_outside_relative, _push(), PushError,
          ["generation_extra.json", "../elsewhere.json", "outside the folder"], _nothing_sent),
    Fault("dangling-symlink", _dangling_link, _push(), PushError,
          ["extra.safetensors", "gone.safetensors", "does not exist"], _nothing_sent),
    Fault("symlink-to-a-directory", _link_to_directory, _push(), PushError,
          ["assets-copy", "links to directories are not followed"], _nothing_sent),
    # --- pickles
    Fault("stray-pickles-next-to-safetensors", _stray_pickles, _push(), PushError,
          ["pytorch_model.bin", "optimizer.pt", "arbitrary code", "allow_pickle=True"],
          _nothing_sent),
    Fault("only-pickle-weights", _only_pickle_weights, _push(), PushError,
          ["pytorch_model.bin", "no *.safetensors", "arbitrary code", "allow_pickle=True"], _nothing_sent),
    # --- corrupt JSON in the folder
    Fault("config-json-not-json", _corrupt("config.json", '{"model_type": "diep_mixtral",'), _push(),
          CorruptFileError, ["config.json", "not valid JSON", "line 1"], _nothing_sent),
    Fault("pruning-report-not-json", _corrupt("pruning_report.json", "{'method': 'frequency'}"), _push(),
          CorruptFileError, ["pruning_report.json", "not valid JSON"], _nothing_sent),
    Fault("config-json-a-list", _corrupt("config.json", "[1, 2]"), _push(), CorruptFileError,
          ["config.json", "expected an object"], _nothing_sent),
    # --- the commit fails after this push created the repo
    Fault("commit-http-500-new-repo", _fault("commit", "500"), _push(), PushError,
          ["commit to tester/tiny-diep-faults failed", "HTTP 500", "created by this push", "exists and is empty",
           *RETRY], _hit("commit", "500", _retry_succeeds(_created_and_empty))),
    Fault("commit-connection-dropped-new-repo", _fault("commit", "drop"), _push(), PushError,
          ["commit to tester/tiny-diep-faults failed", "connection lost", "exists and is empty", *RETRY],
          _hit("commit", "drop", _retry_succeeds(_created_and_empty))),
    Fault("commit-made-but-answer-lost", _fault("commit", "drop-after"), _push(), PushError,
          ["connection lost", "moved", "may have been made", *RETRY],
          _hit("commit", "drop-after", _landed_and_retry_is_a_no_op)),
    Fault("preupload-http-500-after-retries", _fault("preupload", "500", retried=True), _push(), PushError,
          ["commit to tester/tiny-diep-faults failed", "HTTP 500", "exists and is empty", *RETRY],
          _hit("preupload", "500", _created_and_empty)),
    Fault("pr-commit-connection-dropped", _fault("commit", "drop"), _push(create_pr=True), PushError,
          ["connection lost", "exists and is empty", "no pull request was opened", *RETRY],
          _hit("commit", "drop", _created_and_empty)),
    # --- the commit fails on a repo that already had files
    Fault("commit-http-500-existing-repo", _pushed_before(_fault("commit", "500")), _push(), PushError,
          ["HTTP 500", "tester/tiny-diep-faults is unchanged", *RETRY],
          _hit("commit", "500", _retry_succeeds(_unchanged))),
    Fault("commit-http-500-existing-empty-repo", _empty_repo_before(_fault("commit", "500")), _push(), PushError,
          ["HTTP 500", "tester/tiny-diep-faults exists and is still empty", *RETRY],
          _hit("commit", "500", _empty_and_never_recreated)),
    Fault("commit-connection-dropped-existing-repo", _pushed_before(_fault("commit", "drop")), _push(), PushError,
          ["connection lost", "is unchanged", *RETRY], _hit("commit", "drop", _unchanged)),
    # --- connection errors before the commit
    Fault("whoami-connection-dropped", _fault("whoami", "drop"), _push(), PushError,
          ["could not reach the Hub", "nothing was uploaded", *RETRY],
          _hit("whoami", "drop", _no_repo)),
    Fault("model-info-connection-dropped", _fault("model_info", "drop"), _push(), PushError,
          ["could not create or read tester/tiny-diep-faults", "while reading it", "connection lost",
           "nothing was uploaded", *RETRY],
          _hit("model_info", "drop", _no_repo)),
    Fault("create-repo-connection-dropped", _fault("create_repo", "drop"), _push(), PushError,
          ["while creating it", "connection lost", "nothing was uploaded", *RETRY],
          _hit("create_repo", "drop", _no_repo)),
    Fault("create-repo-http-500", _fault("create_repo", "500"), _push(), PushError,
          ["while creating it", "HTTP 500", *RETRY],
          _hit("create_repo", "500", _no_repo)),
    Fault("list-files-connection-dropped", _fault("tree", "drop", retried=True), _push(), PushError,
          ["while listing its files", "connection lost", "created by this push", "exists and is empty", *RETRY],
          _hit("tree", "drop", _created_and_empty)),
]


@pytest.mark.parametrize("row", PUSH_FAULTS, ids=ids(PUSH_FAULTS))
def test_push_fault(row, hub_server, folder, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="diep_hub")
    base = {"tmp_path": tmp_path, "hub": hub_server, "monkeypatch": monkeypatch, "folder": folder}
    bound = dataclasses.replace(row, setup=lambda _tmp: row.setup(base))
    error = check_fault(bound, tmp_path)
    assert hub_server.token not in str(error)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("diep_hub"))
    assert hub_server.token not in logged
    assert "Traceback" not in str(error) and "httpx" not in str(error)
