"""The fake Hub's repositories (tests/helpers/hub_server.py): its user and tokens, commits of files stored by their
git blob id, and each repo's refs and history."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

USER = "tester"
WRITE_TOKEN = "hf_test_write_0123456789abcdef"
READ_TOKEN = "hf_test_read_0123456789abcdef"


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    files: dict[str, str]  # path -> blob oid
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: list[str] = field(default_factory=list)

    def history(self, ref: str = "main") -> list[Commit]:
        out, oid = [], self.refs.get(ref)
        while oid is not None:
            out.append(self.commits[oid])
            oid = self.commits[oid].parent
        return out


def now() -> str:
    """A commit date as the Hub writes it (UTC, milliseconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
