"""Atomic writes: a checkpoint folder (or one JSON file) appears whole or not at all.

Everything is written into a staging folder beside the target and renamed into place at the end, so an
exception (disk full, a bad tokenizer, Ctrl-C) never leaves a half-written checkpoint where a user, a CI upload
step or ``from_pretrained`` could pick it up. Around that:

- the target is checked first (:func:`~diep_hub.checkpoint.folders.check_output_folder`);
- the commit re-checks the target under a lock (``.<name>.lock`` beside it), so two saves racing into the same new
  folder give one checkpoint and one error, never a silently deleted checkpoint;
- the saved tree gets the modes ``save_pretrained`` would give under the user's umask (mkdtemp makes 0700).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterable
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from ..errors import DiEPError
from ..jsonable import to_jsonable
from .folders import _clean_stale_work_folders, check_output_folder, work_folder_prefix

try:
    import fcntl
except ImportError:  # Windows: no flock; the rename itself still refuses a non-empty target
    fcntl = None

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ commit lock
@contextmanager
def _commit_lock(target: Path):
    """Exclusive lock on ``.<name>.lock`` beside ``target``, removed on release.

    The file is unlinked while still locked; a waiter that then gets the lock on the unlinked file sees that the
    path no longer names its file and retries, so removing it never lets two holders in at once.
    """
    if fcntl is None:
        yield
        return
    path = target.parent / f".{target.name}.lock"
    fd = None
    while fd is None:
        candidate = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(candidate, fcntl.LOCK_EX)
        except OSError as exc:  # a filesystem without locks: the rename still refuses a non-empty target
            os.close(candidate)
            with suppress(OSError):
                os.unlink(path)
            logger.debug("no lock for %s (%s); relying on the atomic rename", target, exc)
            break
        try:
            held, named = os.fstat(candidate), os.stat(path)
            same = (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            fd = candidate
        else:
            os.close(candidate)
    try:
        yield
    finally:
        if fd is not None:
            with suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)


# -------------------------------------------------------------------------------------------------- modes
_UMASK_LOCK = threading.Lock()


def _current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only be read by setting)."""
    with suppress(OSError, ValueError, StopIteration):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:"))
        return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _apply_default_modes(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain ``save_pretrained`` would: 0o777 / 0o666 minus umask."""
    umask = _current_umask()
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)
    os.chmod(root, dir_mode)


# --------------------------------------------------------------------------------------------- atomic folder
def _write_error(target: Path, exc: BaseException) -> DiEPError | None:
    """A DiEPError saying what happened when ``exc`` is an I/O failure while writing ``target`` (None otherwise)."""
    if isinstance(exc, DiEPError) or not isinstance(exc, (OSError, SafetensorError)):
        return None
    text = str(exc)
    kept = f"nothing was saved, and any checkpoint already at {target} is unchanged"
    full = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    if getattr(exc, "errno", None) in full or "No space left" in text or "os error 28" in text:
        free = ""
        with suppress(OSError):
            free = f" ({shutil.disk_usage(target.parent).free} bytes free there now)"
        return DiEPError(
            f"could not save the checkpoint {target}: No space left on device{free}; {kept}. Free some space or "
            "save to another disk"
        )
    return DiEPError(f"could not save the checkpoint {target}: {type(exc).__name__}: {text}; {kept}")


@contextmanager
def atomic_directory(
    target: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = ()
):
    """Yield a staging folder that replaces ``target`` only if the block finishes without an exception.

    ``target`` is checked first (:func:`check_output_folder`, with ``inputs``), before anything is written. The
    commit runs under a lock and re-checks: without ``overwrite``, a target that appeared during the save (another
    process saved there first) is an error and the staging folder is removed; with ``overwrite``, the old folder is
    moved aside, the new one renamed in, and the old one put back if that fails. I/O errors (disk full included)
    become a DiEPError naming the folder; other exceptions propagate unchanged. Nothing is left behind either way.
    """
    inputs = tuple(inputs)
    target = check_output_folder(target, overwrite=overwrite, inputs=inputs)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with _commit_lock(target):
            restored = _clean_stale_work_folders(target)
        if restored:
            check_output_folder(target, overwrite=overwrite, inputs=inputs)
        staging = Path(tempfile.mkdtemp(prefix=work_folder_prefix(target, "tmp"), dir=parent))
    except OSError as exc:
        raise _write_error(target, exc) from exc
    with _discard_on_error(staging, target):
        yield staging
        _apply_default_modes(staging)
    with _discard_on_error(staging, target), _commit_lock(target):
        _commit(staging, target, overwrite=overwrite, inputs=inputs)


@contextmanager
def _discard_on_error(staging: Path, target: Path):
    """Whatever fails (Ctrl-C included), remove the staging folder; an I/O error becomes a DiEPError naming
    ``target``, any other exception propagates unchanged."""
    try:
        yield
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        error = _write_error(target, exc)
        if error is not None:
            raise error from exc
        raise


def _commit(staging: Path, target: Path, *, overwrite: bool, inputs: tuple) -> None:
    """Rename ``staging`` to ``target``; called under the commit lock."""
    appeared = DiEPError(
        f"{target} appeared during the save (another process saved there first); it was left as it is and this "
        "save was discarded: pass overwrite=True to replace it, or choose another folder"
    )
    occupied = os.path.lexists(target) and not (target.is_dir() and not any(target.iterdir()))
    if occupied and not overwrite:
        raise appeared
    if not occupied:
        try:
            os.rename(staging, target)  # replaces an empty folder; fails on a non-empty one (ENOTEMPTY / EEXIST)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise appeared from exc
            raise
        return
    check_output_folder(target, overwrite=True, inputs=inputs)  # it may have changed since the save began
    backup = target.with_name(work_folder_prefix(target, "old") + secrets.token_hex(4))
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException as exc:
        try:
            os.rename(backup, target)
        except OSError as restore_error:
            raise DiEPError(
                f"could not move the new checkpoint into {target} ({exc}) nor put the previous one back "
                f"({restore_error}); the previous checkpoint is in {backup}"
            ) from exc
        raise
    shutil.rmtree(backup, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ one JSON file
def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON beside ``path`` and rename it into place: a failure never leaves a half-written file."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        staging.write_text(json.dumps(to_jsonable(data), indent=2) + "\n", encoding="utf-8")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


__all__ = ["atomic_directory", "write_json_atomic"]
