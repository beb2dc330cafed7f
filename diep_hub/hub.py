"""Publishing pruned checkpoints on the Hugging Face Hub: one commit, re-runnable, token-safe.

``push`` checks everything it can before sending a byte: the repo id, the folder (config, weights, remote code),
the token (present, accepted by the Hub, allowed to write) and that no file to upload contains the token. It then
creates the repo (``exist_ok``), and sends weights, config, remote code, card, report, recipe and
``.eval_results`` in a single ``create_commit`` (optionally as a pull request). Files identical to those already on
the branch are skipped by huggingface_hub, so pushing the same folder twice makes no new commit; stale weight
shards of an earlier push with different sharding are deleted in the same commit. The token is only handed to
huggingface_hub: it is never logged, put in a message, or written anywhere.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError

from .errors import DiEPError

logger = logging.getLogger(__name__)

REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}$")
# Never uploaded: caches, temp folders of atomic saves, VCS data.
IGNORED = (".git/*", ".git", "__pycache__/*", "*/__pycache__/*", "*.pyc", ".cache/*", ".*.tmp-*", ".*.old-*",
           ".DS_Store")
# Remote files a new push may replace by different names (sharding, eval entries): stale ones are deleted.
REPLACEABLE = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", ".eval_results/*.yaml")
WRITE_ROLES = ("write", "admin", "fineGrained")
_SCAN_LIMIT = 10 * 1024 * 1024  # text files up to this size are scanned for the token


class PushError(DiEPError):
    """Publishing refused or failed; the message names the repo and what to do next (never the token)."""


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not REPO_ID_PATTERN.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise PushError(
            f"repo_id={repo_id!r} is not a valid Hub model id; use 'namespace/name' (letters, digits, '-', '_', "
            "'.'; no '--' or '..'), e.g. 'my-user/Mixtral-8x7B-DiEP-50'"
        )


def _files(folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        if any(fnmatch.fnmatch(rel, pattern) for pattern in IGNORED) or any(
            part.startswith(".") and part != ".eval_results" for part in Path(rel).parts[:-1]
        ):
            continue
        out.append(rel)
    return out


def check_folder(folder: str | os.PathLike) -> list[str]:
    """The files that would be uploaded; refuse a folder that would not load from the Hub."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder; save the pruned model first (save_pruned / DiEPPruner.save)")
    files = _files(folder)
    if "config.json" not in files:
        raise PushError(f"{folder} has no config.json: it is not a model checkpoint")
    if not any(f.endswith((".safetensors", ".bin")) for f in files):
        raise PushError(f"{folder} has no weights (*.safetensors); the upload would not load")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    auto_map = config.get("auto_map") or {}
    refs = [ref for ref in auto_map.values() if isinstance(ref, str) and "--" not in ref]  # "repo--mod.Cls": remote
    needed = sorted({ref.split(".")[0] + ".py" for ref in refs})
    missing = [name for name in needed if name not in files]
    if missing:
        raise PushError(f"{folder}: config.json auto_map needs {missing}, which are missing; re-save the checkpoint")
    return files


def _resolve_token(token: str | None) -> str:
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise PushError("token must be a non-empty string (a Hugging Face access token with write access)")
    token = token or get_token()
    if not token:
        raise PushError(
            "no Hugging Face token found: pass token=..., set HF_TOKEN, or run `hf auth login` "
            "(a token with write access is needed to push)"
        )
    return token


def _check_token(api: HfApi, token: str) -> str:
    """The account name behind the token; refuse a rejected or read-only token before any upload."""
    try:
        info = api.whoami(token=token)
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise PushError(
                f"the Hub at {api.endpoint} rejected the token (401 Unauthorized): it is invalid or expired; "
                "create a write token at https://huggingface.co/settings/tokens and set HF_TOKEN"
            ) from None
        raise PushError(f"could not check the token with {api.endpoint}: HTTP {status}") from None
    except Exception as exc:  # noqa: BLE001 - connection errors of any HTTP stack; the message names no token
        raise PushError(f"could not reach the Hub at {api.endpoint} to check the token: {type(exc).__name__}") from None
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role is not None and role not in WRITE_ROLES:
        raise PushError(f"the token of {info.get('name')!r} is {role!r}; pushing needs a token with write access")
    return str(info.get("name"))


def _check_no_token_in_files(folder: Path, files: list[str], token: str) -> None:
    needle = token.encode()
    for rel in files:
        path = folder / rel
        if path.suffix in (".safetensors", ".bin", ".png") or path.stat().st_size > _SCAN_LIMIT:
            continue
        if needle in path.read_bytes():
            raise PushError(f"{rel} contains your Hugging Face token; remove it before pushing (nothing was uploaded)")


def default_commit_message(folder: Path) -> str:
    """"Upload <name>: <method> expert pruning, <kept>/<total> routed experts (diep_hub <version>)"."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    kept = [n for n in config.get("num_experts_per_layer") or [] if n is not None]
    original = [n for n in config.get("original_num_experts") or [] if n is not None]
    pruning = config.get("diep_pruning") or {}
    report_file = folder / "pruning_report.json"
    report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else {}
    method = report.get("method") or pruning.get("method")
    parts = [f"Upload {config.get('model_type', 'model')} checkpoint: {method + ' ' if method else ''}expert pruning"]
    if kept and original:
        parts.append(f", {sum(kept)}/{sum(original)} routed experts kept")
    from . import __version__

    parts.append(f" (diep_hub {__version__})")
    return "".join(parts)


def push(
    folder_or_model: str | os.PathLike | Any,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    commit_message: str | None = None,
    tokenizer=None,
):
    """Publish a pruned checkpoint folder (or a pruned model, saved first) to the Hub in one commit.

    Args:
        folder_or_model: a folder written by ``save_pruned`` / ``DiEPPruner.save``, or a pruned model.
        repo_id: ``namespace/name`` of the model repo (created if missing).
        token: a write token; default: ``HF_TOKEN`` or the token saved by ``hf auth login``.
        private: create the repo as private (an existing repo keeps its visibility; a warning says so when it
            is public).
        create_pr: open a pull request instead of committing to main. Each push with create_pr opens a new pull
            request (the "nothing changed" check compares with main, which the pull request has not changed).
        commit_message: default names the architecture, method and experts kept.
        tokenizer: saved with a model (ignored for a folder).

    Returns:
        huggingface_hub's ``CommitInfo`` (``commit_url``, ``oid``, ``pr_url``). When nothing changed since the last
        push, no commit is made and the latest commit is returned.
    """
    _check_repo_id(repo_id)
    for name, value in (("private", private), ("create_pr", create_pr)):
        if not isinstance(value, bool):
            raise PushError(f"{name}={value!r} must be True or False")
    if commit_message is not None and (not isinstance(commit_message, str) or not commit_message.strip()):
        raise PushError("commit_message must be a non-empty string (or None for the default)")
    if isinstance(folder_or_model, (str, os.PathLike)):
        return _push_folder(Path(folder_or_model), repo_id, token, private, create_pr, commit_message)
    from .saving import save_pruned

    with tempfile.TemporaryDirectory(prefix="diep-hub-push-") as tmp:
        folder = Path(tmp) / "checkpoint"
        save_pruned(folder_or_model, folder, tokenizer=tokenizer)
        from .card import build_model_card, write_card

        write_card(folder, build_model_card(folder, repo_id=repo_id))
        return _push_folder(folder, repo_id, token, private, create_pr, commit_message)


def check_write_token(token: str | None = None) -> str:
    """The account behind the token (argument, ``HF_TOKEN`` or ``hf auth login``) after the Hub accepted it as a
    write token; a PushError otherwise. Runs before hours of pruning, so a bad token fails in seconds."""
    if constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set: pushing needs the Hub; unset HF_HUB_OFFLINE and run again")
    return _check_token(HfApi(), _resolve_token(token))


def _push_folder(folder: Path, repo_id: str, token: str | None, private: bool, create_pr: bool, message: str | None):
    files = check_folder(folder)
    if constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set: pushing needs the Hub; unset HF_HUB_OFFLINE and run again")
    token = _resolve_token(token)
    api = HfApi()
    user = _check_token(api, token)
    _check_no_token_in_files(folder, files, token)
    message = message or default_commit_message(folder)
    logger.info("pushing %d files from %s to %s as %s%s", len(files), folder, repo_id, user,
                " (pull request)" if create_pr else "")
    try:
        url = api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        if private and not api.model_info(repo_id, token=token).private:
            logger.warning(
                "%s already exists and is public: private=True only applies to a new repository, so this push is "
                "public; change the visibility in the repository settings first if it must not be", repo_id
            )
        remote = set(api.list_repo_files(repo_id, token=token, repo_type="model"))
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise PushError(
            f"could not create or read {repo_id} on {api.endpoint} (HTTP {status}); check that the token may "
            "write to that namespace"
        ) from None
    local = set(files)
    stale = sorted(p for p in remote - local if any(fnmatch.fnmatch(p, pat) for pat in REPLACEABLE))
    operations: list = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in files]
    operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
    try:
        info = api.create_commit(
            repo_id, operations, commit_message=message, token=token, repo_type="model", create_pr=create_pr,
            commit_description=f"Pushed with diep_hub from a local checkpoint ({len(files)} files).",
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise PushError(f"the commit to {repo_id} failed (HTTP {status}); nothing was changed on the Hub") from None
    logger.info("pushed %s: %s", url, info.pr_url or info.commit_url)
    return info


__all__ = ["PushError", "check_folder", "check_write_token", "default_commit_message", "push"]
