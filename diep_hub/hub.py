"""Publishing pruned checkpoints on the Hugging Face Hub: one commit, re-runnable, token-safe.

``push`` checks everything it can before sending a byte: the repo id, the folder (config, weights, remote code,
JSON files, symlinks, pickles), the token (present, accepted by the Hub, allowed to write) and that nothing it sends
contains the token: every file to upload is scanned whole, whatever its size or type (weights included), as are
the commit message and the file names. It then creates the repo if it is missing, and sends weights, config,
remote code, card, report, recipe and ``.eval_results`` in a single ``create_commit`` (optionally as a pull
request). Files identical to those already on the branch are skipped by huggingface_hub, so pushing the same
folder twice makes no new commit; stale weight shards of an earlier push with different sharding are deleted in
the same commit. A commit is atomic on the Hub, so a push that fails (HTTP error, dropped connection) leaves the
repo as it was and can simply be run again. The token is only handed to huggingface_hub: it is never logged, put
in a message, or written anywhere.

What is uploaded from the folder, and the refusals that need only the folder (symlinks out of it, pickles, damaged
metadata, the token inside a file), are :mod:`diep_hub.checkpoint.upload`.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id

from .checkpoint.layout import CONFIG_FILE, EVAL_RESULTS_DIR, LM_EVAL_RESULTS_DIR
from .checkpoint.upload import PushError, check_folder, check_no_token_sent
from .files import read_json_object

logger = logging.getLogger(__name__)

# Remote files a new push may replace by different names (sharding, eval entries): stale ones are deleted.
REPLACEABLE = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", f"{EVAL_RESULTS_DIR}/*.yaml",
               f"{LM_EVAL_RESULTS_DIR}/*.json")
WRITE_ROLES = ("write", "admin", "fineGrained")
_RETRY = "retry: the push is idempotent (files already on the Hub are skipped, so a re-run makes at most one commit)"


REPO_ID_ALLOWED = ("'namespace/name' (letters, digits, '-', '_', '.'; no '--' or '..'), "
                   "e.g. 'my-user/Mixtral-8x7B-DiEP-50'")


def repo_id_problem(repo_id: object) -> str | None:
    """Why ``repo_id`` cannot name a model repo to push to or download, or None when it can.

    The one repo-id rule of diep_hub (push, ``inspect``/``reproduce`` sources, ``publish.repo_id`` in recipes):
    huggingface_hub's own ``validate_repo_id``, plus the namespace a repo we create needs.
    """
    if not isinstance(repo_id, str):
        return f"a string is needed, not {type(repo_id).__name__}"
    if repo_id.count("/") != 1:
        return "it needs exactly one '/' between namespace and name"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return str(exc)
    return None


def _check_repo_id(repo_id: str) -> None:
    problem = repo_id_problem(repo_id)
    if problem is not None:
        raise PushError(f"repo_id={repo_id!r} is not a valid Hub model id ({problem}); use {REPO_ID_ALLOWED}")


def cache_folder(name: str) -> Path:
    """diep_hub's cache folder ``name`` (offline corpora, trained zoo models), created if missing.

    ``$DIEP_HUB_CACHE/<name>`` when that is set; otherwise beside huggingface_hub's own caches, in its assets cache
    for libraries: ``$HF_ASSETS_CACHE/diep_hub/<name>``, where ``HF_ASSETS_CACHE`` defaults to ``$HF_HOME/assets``
    and ``HF_HOME`` to ``$XDG_CACHE_HOME/huggingface`` (``~/.cache/huggingface``), as every Hugging Face library
    resolves them (read from ``huggingface_hub.constants``).
    """
    root = os.environ.get("DIEP_HUB_CACHE")
    base = Path(root).expanduser() if root else Path(constants.HF_ASSETS_CACHE).expanduser() / "diep_hub"
    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _resolve_token(token: str | None) -> str:
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise PushError("token must be a non-empty string (a Hugging Face access token with write access)")
    token = token or get_token()
    if not token:
        raise PushError(
            "no Hugging Face token found: set HF_TOKEN, run `hf auth login`, or pass token=... "
            "(a token with write access is needed to push)"
        )
    return token


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _cause(exc: BaseException, token: str) -> str:
    """What went wrong, for a message: the HTTP status, or the error type and text with the token scrubbed."""
    status = _status(exc)
    if isinstance(exc, HfHubHTTPError) and status is not None:
        return f"HTTP {status}"
    text = str(exc).replace(token, "<token>").splitlines()
    detail = f": {text[0][:200]}" if text and text[0] else ""
    kind = "connection lost" if _is_connection_error(exc) else "error"
    return f"{kind}, {type(exc).__name__}{detail}"


def _is_connection_error(exc: BaseException) -> bool:
    """A transport failure (refused, reset, dropped, timed out) of whichever HTTP stack huggingface_hub uses."""
    if isinstance(exc, HfHubHTTPError):
        return False
    stacks = {"httpx", "httpcore", "h11", "h2", "requests", "urllib3", "ssl", "socket"}  # httpx2 -> httpx, too
    roots = {(cls.__module__ or "").split(".")[0] for cls in type(exc).__mro__}
    return isinstance(exc, OSError) or bool(stacks & (roots | {root.rstrip("0123456789") for root in roots}))


def _check_token(api: HfApi, token: str) -> str:
    """The account name behind the token; refuse a rejected or read-only token before any upload."""
    try:
        info = api.whoami(token=token)
    except HfHubHTTPError as exc:
        status = _status(exc)
        if status == 401:
            raise PushError(
                f"the Hub at {api.endpoint} rejected the token (401 Unauthorized): it is invalid or expired; "
                "create a write token at https://huggingface.co/settings/tokens and set HF_TOKEN"
            ) from None
        raise PushError(f"could not check the token with {api.endpoint}: HTTP {status}; nothing was uploaded, "
                        f"{_RETRY}") from None
    except Exception as exc:  # noqa: BLE001 - connection errors of any HTTP stack; the message names no token
        raise PushError(f"could not reach the Hub at {api.endpoint} to check the token: {type(exc).__name__}; "
                        f"nothing was uploaded, {_RETRY}") from None
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role is not None and role not in WRITE_ROLES:
        raise PushError(f"the token of {info.get('name')!r} is {role!r}; pushing needs a token with write access")
    return str(info.get("name"))

def _int_list(value: Any) -> list[int]:
    return [n for n in value if isinstance(n, int)] if isinstance(value, list) else []


def default_commit_message(folder: Path) -> str:
    """"Upload <name>: <method> expert pruning, <kept>/<total> routed experts (diep_hub <version>)"."""
    folder = Path(folder)
    config = read_json_object(folder / CONFIG_FILE, "model config")
    kept = _int_list(config.get("num_experts_per_layer"))
    original = _int_list(config.get("original_num_experts"))
    from .checkpoint.report import PruningReport

    method = PruningReport.for_checkpoint(config, PruningReport.load(folder)).method
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
    allow_pickle: bool = False,
    revision: str | None = None,
):
    """Publish a pruned checkpoint folder (or a pruned model, saved first) to the Hub in one commit.

    Args:
        folder_or_model: a folder written by ``save_pruned`` / ``DiEPPruner.save``, or a pruned model.
        repo_id: ``namespace/name`` of the model repo (created if missing).
        token: a write token; default: ``HF_TOKEN`` or the token saved by ``hf auth login``.
        private: create the repo as private (an existing repo keeps its visibility; a warning says so when it
            is public).
        create_pr: open a pull request instead of committing to main. Files are compared with main: when nothing
            differs from main, no pull request is opened (a warning says so and ``pr_url`` is None); otherwise
            each push opens a new pull request.
        commit_message: default names the architecture, method and experts kept.
        tokenizer: saved with a model (ignored for a folder).
        allow_pickle: also upload pickle files (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``); refused by default
            because loading a pickle runs arbitrary code.
        revision: the branch to commit to (default: main), as ``hf upload --revision``: created from main when
            missing; with ``create_pr`` the pull request targets it (then it must exist).

    Returns:
        huggingface_hub's ``CommitInfo`` (``commit_url``, ``oid``, ``pr_url``). When nothing changed since the last
        push, no commit is made and the latest commit of main is returned.

    Raises:
        PushError: refused before upload (repo id, folder, token, token found in a file, symlink, pickle), or the
            Hub failed (HTTP error or dropped connection); the message says what is on the Hub now and whether a
            retry is safe. CorruptFileError: ``config.json`` / ``pruning_report.json`` is not valid JSON (or a report
            field has the wrong shape).
    """
    _check_repo_id(repo_id)
    for name, value in (("private", private), ("create_pr", create_pr), ("allow_pickle", allow_pickle)):
        if not isinstance(value, bool):
            raise PushError(f"{name}={value!r} must be True or False")
    if commit_message is not None and (not isinstance(commit_message, str) or not commit_message.strip()):
        raise PushError("commit_message must be a non-empty string (or None for the default)")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise PushError(f"revision={revision!r} must be a non-empty branch name (or None for main)")
    settings = _PushSettings(token, private, create_pr, commit_message, allow_pickle, revision or "main")
    if isinstance(folder_or_model, (str, os.PathLike)):
        return _push_folder(Path(folder_or_model), repo_id, settings)
    from .checkpoint.saving import save_pruned

    with tempfile.TemporaryDirectory(prefix="diep-hub-push-") as tmp:
        folder = Path(tmp) / "checkpoint"
        save_pruned(folder_or_model, folder, tokenizer=tokenizer)
        from .card import build_model_card, write_card

        write_card(folder, build_model_card(folder, repo_id=repo_id))
        return _push_folder(folder, repo_id, settings)


def check_write_token(token: str | None = None) -> str:
    """The account behind the token (argument, ``HF_TOKEN`` or ``hf auth login``) after the Hub accepted it as a
    write token; a PushError otherwise. Runs before hours of pruning, so a bad token fails in seconds."""
    if constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set: pushing needs the Hub; unset HF_HUB_OFFLINE and run again")
    return _check_token(HfApi(), _resolve_token(token))


def _repo_state(repo_id: str, created: bool, had_files: bool) -> str:
    if created:
        return f"the repo {repo_id} was created by this push: it exists and is empty"
    if not had_files:
        return f"the repo {repo_id} exists and is still empty"
    return f"the repo {repo_id} is unchanged"


def _after_failed_commit(api: HfApi, repo_id: str, token: str, head: str | None, created: bool, had_files: bool,
                         create_pr: bool, branch: str = "main") -> str:
    """What is on the Hub after a failed commit, read back from it (a gateway error or a dropped connection can
    hide a commit that was made)."""
    try:
        now = api.model_info(repo_id, token=token, revision=branch).sha
    except Exception as exc:  # noqa: BLE001 - best effort: the message then says it could not check
        logger.debug("could not read %s back after the failed commit: %s", repo_id, type(exc).__name__)
        now = None
    if now is None:
        return (f"could not read {repo_id} back to check it; a commit is all-or-nothing, so {repo_id} either has "
                "the whole upload or none of it")
    if now != head:
        return (f"{branch} of {repo_id} moved from {str(head)[:8]} to {now[:8]} meanwhile: the commit may have been "
                f"made before the error; check {api.endpoint}/{repo_id}/commits/{branch}")
    state = _repo_state(repo_id, created, had_files)
    if create_pr:
        return (f"{state} on {branch}; no pull request was opened unless the Hub received the commit before the "
                f"error (check {api.endpoint}/{repo_id}/discussions: a re-run opens a new pull request)")
    return f"{state} ({branch} still at {now[:8]})"


def _branch_info(api: HfApi, repo_id: str, token: str, branch: str, create_pr: bool):
    """The model info at ``branch``; a missing branch is created from main (as ``hf upload --revision`` does),
    except for a pull request, which needs an existing branch to target."""
    try:
        return api.model_info(repo_id, token=token, revision=branch)
    except RevisionNotFoundError:
        if create_pr:
            raise PushError(
                f"{repo_id} has no branch {branch!r}: a pull request needs an existing branch to target; push to "
                f"revision={branch!r} without create_pr=True first (that creates the branch from main), or open the "
                "pull request against main (revision=None); nothing was uploaded"
            ) from None
    logger.info("creating the branch %s of %s from main", branch, repo_id)
    api.create_branch(repo_id, branch=branch, token=token, exist_ok=True)
    return api.model_info(repo_id, token=token, revision=branch)


@dataclass(frozen=True)
class _PushSettings:
    """What ``push`` was asked, checked: the token (None: HF_TOKEN or the saved login) and the commit's options."""

    token: str | None
    private: bool
    create_pr: bool
    message: str | None
    allow_pickle: bool
    branch: str


def _push_folder(folder: Path, repo_id: str, settings: _PushSettings):
    files = check_folder(folder, allow_pickle=settings.allow_pickle)
    message = settings.message or default_commit_message(folder)
    if constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set: pushing needs the Hub; unset HF_HUB_OFFLINE and run again")
    token = _resolve_token(settings.token)
    api = HfApi()
    user = _check_token(api, token)
    check_no_token_sent(folder, files, token, message)
    private, create_pr, branch = settings.private, settings.create_pr, settings.branch
    logger.info("pushing %d files from %s to %s%s as %s%s", len(files), folder, repo_id,
                "" if branch == "main" else f" (branch {branch})", user, " (pull request)" if create_pr else "")

    created, step = False, "reading it"
    try:
        try:
            info = api.model_info(repo_id, token=token)
        except RepositoryNotFoundError:
            step = "creating it"
            api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
            created, step = True, "reading it"
            info = api.model_info(repo_id, token=token)
        if private and not created and not info.private:
            logger.warning(
                "%s already exists and is public: private=True only applies to a new repository, so this push is "
                "public; change the visibility in the repository settings first if it must not be", repo_id
            )
        if branch != "main":
            step = f"reading (or creating) its branch {branch}"
            info = _branch_info(api, repo_id, token, branch, create_pr)
        head, step = info.sha, "listing its files"
        remote = set(api.list_repo_files(repo_id, token=token, repo_type="model", revision=branch))
    except Exception as exc:
        if not isinstance(exc, HfHubHTTPError) and not _is_connection_error(exc):
            raise
        state = (f"the repo {repo_id} was created by this push: it exists and is empty" if created
                 else "nothing was uploaded")
        status = _status(exc) if isinstance(exc, HfHubHTTPError) else None
        if status is not None and status < 500:
            hint = "check that the token may write to that namespace"
        else:
            hint = _RETRY
        raise PushError(
            f"could not create or read {repo_id} on {api.endpoint} while {step} ({_cause(exc, token)}); "
            f"{state}; {hint}"
        ) from None

    local = set(files)
    stale = sorted(p for p in remote - local if any(fnmatch.fnmatch(p, pat) for pat in REPLACEABLE))
    operations: list = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in files]
    operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
    try:
        info = api.create_commit(
            repo_id, operations, commit_message=message, token=token, repo_type="model", create_pr=create_pr,
            revision=branch, commit_description=f"Pushed with diep_hub from a local checkpoint ({len(files)} files).",
        )
    except Exception as exc:  # noqa: BLE001 - any failure of the commit: say what is on the Hub and how to go on
        cause = _cause(exc, token)
        state = _after_failed_commit(api, repo_id, token, head, created, bool(remote), create_pr, branch)
        raise PushError(f"the commit to {repo_id} failed ({cause}); {state}; {_RETRY}") from None

    if create_pr and info.pr_url is None:
        logger.warning("no pull request was opened on %s: nothing changed, every file is identical to %s (%s)",
                       repo_id, branch, info.commit_url)
    elif not create_pr and info.oid == head:
        logger.info("nothing changed since the last push: no new commit, %s stays at %s", repo_id, head[:8])
    else:
        logger.info("pushed %s: %s", repo_id, info.pr_url or info.commit_url)
    return info


__all__ = ["PushError", "cache_folder", "check_folder", "check_write_token", "default_commit_message", "push"]
