"""The fake Hub's HTTP protocol (tests/helpers/hub_server.py): the endpoints huggingface_hub and transformers call,
answered from a :class:`~tests.helpers.hub_server.HubServer`'s state, with the injected faults of its docstring."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from tests.helpers.hub_repos import USER, Commit, Repo, now

if TYPE_CHECKING:
    from tests.helpers.hub_server import HubServer


def handler_for(server: HubServer):
    """The request handler class of ``server`` (a closure over its state)."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        # --- plumbing
        def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None, head=False):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, message: str, code: str | None = None, head=False):
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers, head=head)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _auth(self):
            """(user, role) for a valid token, None without one; an invalid token answers 401 and returns False."""
            header = self.headers.get("Authorization") or ""
            if not header.startswith("Bearer "):
                return None
            found = server.tokens.get(header[len("Bearer "):])
            if found is None:
                self._error(401, "Invalid credentials in Authorization header")
                return False
            return found

        def _writer(self, namespace: str):
            who = self._auth()
            if who is False:
                return None
            if who is None:
                self._error(401, "You must be authenticated to do this")
                return None
            if who[1] != "write" or namespace != who[0]:
                self._error(403, "You don't have the rights to write in this namespace")
                return None
            return who

        def _repo(self, repo_id: str, head=False):
            who = self._auth()
            if who is False:
                return None
            repo = server.repos.get(repo_id)
            if repo is None or (repo.private and (who is None or who[0] != repo_id.split("/")[0])):
                self._error(404 if who else 401, "Repository not found", "RepoNotFound", head=head)
                return None
            return repo

        def _writable_repo(self, repo_id: str) -> Repo | None:
            """The repo, when the request's token may write to its namespace; else None (the error is sent)."""
            repo = self._repo(repo_id)
            if repo is None or self._writer(repo_id.split("/")[0]) is None:
                return None
            return repo

        def _commit(self, repo: Repo, rev: str, head=False) -> Commit | None:
            oid = repo.refs.get(rev, rev if rev in repo.commits else None)
            if oid is None:
                self._error(404, f"Revision {rev} not found", "RevisionNotFound", head=head)
                return None
            return repo.commits[oid]

        # --- verbs
        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        def do_DELETE(self):
            self._dispatch("DELETE")

        def _dispatch(self, method: str):
            url = urlsplit(self.path)
            path, query = url.path, parse_qs(url.query)
            server.requests.append((method, path))
            routes = [
                ("GET", r"/api/whoami-v2", self.whoami),
                ("GET", r"/api/agent-harnesses", self.empty_list),
                ("POST", r"/api/repos/create", self.create_repo),
                ("DELETE", r"/api/repos/delete", self.delete_repo),
                ("POST", r"/api/validate-yaml", self.validate_yaml),
                ("POST", r"/api/models/([^/]+/[^/]+)/preupload/(.+)", self.preupload),
                ("POST", r"/api/models/([^/]+/[^/]+)/commit/(.+)", self.commit),
                ("POST", r"/api/models/([^/]+/[^/]+)/branch/(.+)", self.create_branch),
                ("GET", r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", self.tree),
                ("GET", r"/api/models/([^/]+/[^/]+)/commits/([^/]+)", self.commits),
                ("GET", r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", self.model_info),
                ("GET", r"/api/models/([^/]+/[^/]+)", self.model_info),
                ("GET", r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.resolve),
                ("HEAD", r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.resolve),
            ]
            for verb, pattern, handler in routes:
                match = re.fullmatch(pattern, path)
                if verb == method and match:
                    groups = [unquote(g) if g is not None else None for g in match.groups()]
                    fault = server.faults.get(handler.__name__)
                    if fault is not None:
                        return self._fault(fault, handler, groups, query, method == "HEAD")
                    with server.lock:
                        return handler(*groups, query=query, head=method == "HEAD")
            server.unhandled.append((method, self.path))
            self._error(404, f"fake hub: no route for {method} {path}", head=method == "HEAD")

        def _fault(self, fault: str, handler, groups, query, head: bool):
            """Answer an injected failure (see the module docstring)."""
            server.fault_hits.append((handler.__name__, fault))
            if fault == "500":
                self._body()
                return self._error(500, "fake hub: injected internal server error", head=head)
            if fault == "drop-after":
                real, self.wfile = self.wfile, io.BytesIO()  # handle the request, throw the answer away
                try:
                    with server.lock:
                        handler(*groups, query=query, head=head)
                finally:
                    self.wfile = real
            elif fault == "drop":
                self._body()
            else:
                raise ValueError(f"unknown fault {fault!r}; use '500', 'drop' or 'drop-after'")
            self.close_connection = True  # closed without a status line: the client sees the connection drop
            self.wfile.flush()

        # --- endpoints
        def whoami(self, query, head):
            who = self._auth()
            if who is False:
                return
            if who is None:
                return self._error(401, "Unauthorized")
            self._send(200, {"type": "user", "name": who[0], "orgs": [],
                             "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": who[1]}}})

        def empty_list(self, query, head):
            self._send(200, [])

        def create_repo(self, query, head):
            data = json.loads(self._body() or b"{}")
            namespace = data.get("organization") or (self._auth() or ("",))[0]
            repo_id = f"{namespace}/{data['name']}"
            if self._writer(namespace) is None:
                return
            url = f"{server.endpoint}/{repo_id}"
            if repo_id in server.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            repo = Repo(repo_id, bool(data.get("private")) or data.get("visibility") == "private")
            initial = Commit(hashlib.sha1(f"init {repo_id}".encode()).hexdigest(), None, "initial commit", "", {},
                             now())
            repo.commits[initial.oid] = initial
            repo.refs["main"] = initial.oid
            server.repos[repo_id] = repo
            self._send(200, {"url": url, "name": repo_id})

        def delete_repo(self, query, head):
            data = json.loads(self._body() or b"{}")
            namespace = data.get("organization") or (self._auth() or ("",))[0]
            if self._writer(namespace) is None:
                return
            server.repos.pop(f"{namespace}/{data['name']}", None)
            self._send(200, {})

        def create_branch(self, repo_id, branch, query, head):
            """``HfApi.create_branch``: a new ref at ``startingPoint`` (default: main's head); 409 if it exists."""
            repo = self._writable_repo(repo_id)
            if repo is None:
                return
            data = json.loads(self._body() or b"{}")
            start = repo.refs.get(data.get("startingPoint") or "main", data.get("startingPoint"))
            if branch in repo.refs:
                return self._error(409, f"Reference already exists: refs/heads/{branch}")
            if start not in repo.commits:
                return self._error(404, f"Revision not found: {data.get('startingPoint')}")
            repo.refs[branch] = start
            self._send(200, {})

        def validate_yaml(self, query, head):
            data = json.loads(self._body() or b"{}")
            content = data.get("content", "")
            match = re.match(r"^---\n(.*?)\n---", content, re.S)
            try:
                meta = yaml.safe_load(match.group(1)) if match else {}
            except yaml.YAMLError as exc:
                return self._send(400, {"error": f"Invalid YAML in README.md: {exc}"})
            if meta is not None and not isinstance(meta, dict):
                return self._send(400, {"error": "README.md metadata must be a mapping"})
            self._send(200, {"errors": [], "warnings": []})

        def preupload(self, repo_id, rev, query, head):
            repo = self._writable_repo(repo_id)
            commit = None if repo is None else self._commit(repo, rev)
            if commit is None:
                return
            files = json.loads(self._body())["files"]
            self._send(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": commit.files.get(f["path"])}
                for f in files
            ], "commitOid": commit.oid})

        def commit(self, repo_id, rev, query, head):
            repo = self._writable_repo(repo_id)
            base = None if repo is None else self._commit(repo, rev)
            if base is None:
                return
            header, files = {}, dict(base.files)
            for line in self._body().splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                elif key == "file":
                    content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else \
                        value["content"].encode()
                    files[value["path"]] = server.put_blob(content)
                elif key == "deletedFile":
                    if value["path"] not in files:
                        return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                    files.pop(value["path"])
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: o for p, o in files.items() if not p.startswith(prefix)}
                else:
                    return self._error(400, f"fake hub: unsupported commit entry {key!r} (only regular uploads)")
            if header.get("parentCommit") and header["parentCommit"] != base.oid:
                return self._error(412, "parent commit is not the head of the branch")
            title = header.get("summary", "")
            seed = json.dumps([base.oid, title, sorted(files.items()), time.time_ns()]).encode()
            oid = hashlib.sha1(seed).hexdigest()
            repo.commits[oid] = Commit(oid, base.oid, title, header.get("description", ""), files, now())
            body = {"commitUrl": f"{server.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}
            if query.get("create_pr") == ["1"]:
                repo.prs.append(oid)
                number = len(repo.prs)
                repo.refs[f"refs/pr/{number}"] = oid
                body["pullRequestUrl"] = f"{server.endpoint}/{repo_id}/discussions/{number}"
            else:
                repo.refs[rev] = oid
            self._send(200, body)

        def model_info(self, repo_id, rev="main", query=None, head=False):
            repo = self._repo(repo_id)
            if repo is None:
                return
            commit = self._commit(repo, rev or "main")
            if commit is None:
                return
            info = {"id": repo_id, "_id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private,
                    "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                    "createdAt": repo.history()[-1].date, "lastModified": commit.date,
                    "siblings": [{"rfilename": p} for p in sorted(commit.files)]}
            readme = commit.files.get("README.md")
            if readme:
                match = re.match(r"^---\n(.*?)\n---", server.blob(readme).decode(), re.S)
                if match:
                    info["cardData"] = yaml.safe_load(match.group(1)) or {}
            self._send(200, info)

        def tree(self, repo_id, rev, sub, query, head):
            repo = self._repo(repo_id)
            if repo is None:
                return
            commit = self._commit(repo, rev)
            if commit is None:
                return
            prefix = (sub or "").strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            entries, dirs = [], set()
            for path, oid in sorted(commit.files.items()):
                if prefix and not path.startswith(prefix + "/"):
                    continue
                rest = path[len(prefix) + 1:] if prefix else path
                parts = rest.split("/")
                for depth in range(1, len(parts)):
                    d = "/".join(([prefix] if prefix else []) + parts[:depth])
                    if (recursive or depth == 1) and d not in dirs:
                        dirs.add(d)
                        entries.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(),
                                        "size": 0, "path": d})
                if recursive or len(parts) == 1:
                    entries.append({"type": "file", "oid": oid, "size": (server.blobs / oid).stat().st_size,
                                    "path": path})
            if prefix and not entries:
                return self._error(404, f"{prefix} does not exist on {rev}", "EntryNotFound")
            self._send(200, entries)

        def commits(self, repo_id, rev, query, head):
            repo = self._repo(repo_id)
            if repo is None:
                return
            if self._commit(repo, rev) is None:
                return
            self._send(200, [{"id": c.oid, "title": c.title, "message": c.description, "date": c.date,
                              "authors": [{"user": USER}]} for c in repo.history(rev)])

        def resolve(self, repo_id, rev, path, query, head):
            repo = self._repo(repo_id, head=head)
            if repo is None:
                return
            commit = self._commit(repo, rev, head=head)
            if commit is None:
                return
            oid = commit.files.get(path)
            if oid is None:
                headers = {"X-Repo-Commit": commit.oid}
                return self._send(404, {"error": "Entry not found"},
                                  {**headers, "X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"},
                                  head=head)
            content = server.blob(oid)
            self._send(200, content, {"X-Repo-Commit": commit.oid, "ETag": f'"{oid}"',
                                      "Content-Type": "application/octet-stream"}, head=head)

    return Handler
