"""A Hub that runs in the test process: the Hugging Face Hub's HTTP protocol on 127.0.0.1, files in a temp dir.

The real ``huggingface_hub`` client (and ``transformers.from_pretrained`` in a subprocess) talk to it through
``HF_ENDPOINT`` / ``huggingface_hub.constants``. It implements what huggingface_hub 2.4 and transformers 5.23 call
(see shared/docs/offline-testing.md): whoami, repo create/delete, YAML validation, preupload (always "regular",
so files travel inline and Xet/LFS is never needed), NDJSON commits (optionally as pull requests), model info,
tree listing, commits listing and ``resolve`` downloads with ``X-Repo-Commit`` / ``ETag`` headers.

Use the ``hub_server`` fixture: it yields a :class:`HubServer` whose ``endpoint``, ``token`` (write),
``read_token`` and ``user`` a test needs, and whose ``repos`` state a test can assert on.

Faults: ``server.faults[endpoint] = "500" | "drop" | "drop-after"`` makes every request to that endpoint (the
handler's name: ``whoami``, ``create_repo``, ``preupload``, ``commit``, ``tree``, ``model_info``, ``commits``,
``resolve``) answer HTTP 500, or close the connection without a response after reading the request ("drop": the
request had no effect) or after handling it ("drop-after": the effect happened, the answer is lost). Each hit is
recorded in ``server.fault_hits``.

This module holds the server's state and lifecycle; the HTTP endpoints are in hub_protocol.py, the repositories
(commits, refs, blob ids) in hub_repos.py.
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers.hub_protocol import handler_for
from tests.helpers.hub_repos import READ_TOKEN, USER, WRITE_TOKEN, Repo, git_blob_oid


class HubServer:
    """State and lifecycle of the fake Hub."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.tokens = {WRITE_TOKEN: (USER, "write"), READ_TOKEN: (USER, "read")}
        self.requests: list[tuple[str, str]] = []  # (method, path), for assertions
        self.unhandled: list[tuple[str, str]] = []
        self.faults: dict[str, str] = {}  # endpoint name -> "500" | "drop" | "drop-after" (see the module docstring)
        self.fault_hits: list[tuple[str, str]] = []  # (endpoint name, fault) of each injected failure
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(self))
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    user = USER
    token = WRITE_TOKEN
    read_token = READ_TOKEN

    def start(self) -> HubServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- storage
    def put_blob(self, content: bytes) -> str:
        oid = git_blob_oid(content)
        path = self.blobs / oid
        if not path.exists():
            path.write_bytes(content)
        return oid

    def blob(self, oid: str) -> bytes:
        return (self.blobs / oid).read_bytes()

    def file(self, repo_id: str, path: str, ref: str = "main") -> bytes:
        repo = self.repos[repo_id]
        return self.blob(repo.commits[repo.refs[ref]].files[path])

    def all_stored_bytes(self) -> list[bytes]:
        return [p.read_bytes() for p in self.blobs.iterdir()]


def serve(tmp_path: Path, monkeypatch):
    """Start a fake Hub and point this process's huggingface_hub at it (online, no Xet, no stored token).

    A generator for fixtures: ``yield from serve(tmp_path, monkeypatch)``; the server stops afterwards.
    """
    from huggingface_hub import constants

    server = HubServer(tmp_path / "hub-storage").start()
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A running fake Hub (see :func:`serve`), for a conftest or plugin that registers this module."""
    yield from serve(tmp_path, monkeypatch)
