"""Atomic saving of pruned checkpoints.

Everything is written into a staging folder beside the target and renamed into place at the end, so an
exception (disk full, a bad tokenizer, Ctrl-C) never leaves a half-written checkpoint where a user, a CI upload
step or ``from_pretrained`` could pick it up. Around that:

- the output folder is checked before anything is written (:func:`check_output_folder`): never the working
  directory or a folder holding it, a git work tree, or a folder holding one of the run's inputs; with
  ``overwrite=True`` only an empty folder or one that looks like a checkpoint is replaced;
- the commit re-checks the target under a lock (``.<name>.lock`` beside it), so two saves racing into the same new
  folder give one checkpoint and one error, never a silently deleted checkpoint;
- staging (``.<name>.tmp-<host>-<pid>-<random>``) and backup (``.<name>.old-...``) folders left by a killed save
  are removed by the next save into the same parent once their creator is gone (a backup whose target is missing
  is the previous checkpoint: it is put back instead);
- the saved tree gets the modes ``save_pretrained`` would give under the user's umask (mkdtemp makes 0700).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager, suppress
from fnmatch import fnmatch
from pathlib import Path

from safetensors import SafetensorError
from torch import nn

from .errors import ConfigError, DiEPError
from .modeling import REMOTE_CODE_FILES
from .pruned_format import is_pruned, to_stock_model, uniform_expert_count

try:
    import fcntl
except ImportError:  # Windows: no flock; the rename itself still refuses a non-empty target
    fcntl = None

logger = logging.getLogger(__name__)

# What a transformers / diep_hub checkpoint folder holds; overwrite=True replaces only such a folder.
CHECKPOINT_FILE_PATTERNS = (
    "*.safetensors",
    "*.json",
    "*.py",
    "*.md",
    "*.yaml",
    "*.yml",
    "*.png",
    "*.jinja",  # chat_template.jinja
    "*.model",  # sentencepiece tokenizers
    "*.tiktoken",
    "vocab.txt",
    "merges.txt",
    "pytorch_model*.bin",
    "training_args.bin",
    ".gitattributes",
)
CHECKPOINT_SUBFOLDERS = ("assets", ".eval_results")  # card figures, Hub eval results
DOWNLOAD_METADATA = ".cache"  # `hf download --local-dir` bookkeeping
_LISTED = 5


# ----------------------------------------------------------------------------------------- output folder checks
def check_output_folder(
    target: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """Refuse an output folder whose replacement would destroy something that is not a checkpoint.

    Refused always (even with ``overwrite=True``): a file, the filesystem root, the home directory, the current
    working directory or a folder containing it, a folder holding ``.git``, a folder containing any of ``inputs``
    (the recipe, calibration data, perplexity text: whatever the run reads). A non-empty folder needs
    ``overwrite=True``, and is then replaced only when it looks like a checkpoint (``config.json`` and only the
    files a save writes). Reads only; returns the resolved path. Call it before any long work.
    """
    target = Path(target).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target} exists and is a file; give a folder path")
    if target.parent == target:
        raise ConfigError(f"{target} is the filesystem root; give a folder of its own for the checkpoint")
    with suppress(RuntimeError, KeyError):
        if target == Path.home().resolve():
            raise ConfigError(f"{target} is your home directory; give a folder of its own for the checkpoint")
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was deleted
        cwd = None
    if cwd is not None and target == cwd:
        raise ConfigError(
            f"{target} is the current working directory; saving there would replace everything in it: give a "
            "new folder (e.g. ./pruned) for the checkpoint"
        )
    if cwd is not None and target in cwd.parents:
        raise ConfigError(
            f"{target} contains the current working directory ({cwd}); saving there would replace it: give a new "
            "folder for the checkpoint"
        )
    if (target / ".git").exists():
        raise ConfigError(
            f"{target} holds a git repository (.git); saving there would replace the repository: give a new "
            "folder for the checkpoint"
        )
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser().resolve()
        if source == target or target in source.parents:
            raise ConfigError(
                f"{target} contains {source}, an input of this run; saving there would delete it: give another "
                "folder for the checkpoint, or move the input out of it"
            )
    if not target.is_dir() or not any(target.iterdir()):
        return target
    if not overwrite:
        raise ConfigError(f"{target} already exists and is not empty; pass overwrite=True or choose another folder")
    unexpected = _non_checkpoint_entries(target)
    if unexpected:
        more = f" and {len(unexpected) - _LISTED} more" if len(unexpected) > _LISTED else ""
        raise ConfigError(
            f"{target} does not look like a checkpoint folder, so overwrite=True will not replace it: it holds "
            f"{', '.join(unexpected[:_LISTED])}{more}. overwrite=True replaces only an empty folder or a "
            "checkpoint (config.json, *.safetensors, *.json, *.py, *.md, *.yaml, *.png, tokenizer files, assets/, "
            ".eval_results/); move those files away or choose another folder"
        )
    if not (target / "config.json").is_file():
        raise ConfigError(
            f"{target} has no config.json, so it is not a checkpoint and overwrite=True will not replace it; "
            "empty it or choose another folder"
        )
    return target


def _non_checkpoint_entries(folder: Path) -> list[str]:
    """Relative paths in ``folder`` that a checkpoint save would not have written (folders end with ``/``)."""
    unexpected = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.is_dir() and not entry.is_symlink():
            if entry.name == DOWNLOAD_METADATA:
                if any(p.name != "huggingface" for p in entry.iterdir()):
                    unexpected.append(f"{entry.name}/")
            elif entry.name in CHECKPOINT_SUBFOLDERS:
                for path in sorted(entry.rglob("*")):
                    if path.is_dir() and not path.is_symlink():
                        continue
                    if not _is_checkpoint_file(path.name):
                        unexpected.append(path.relative_to(folder).as_posix())
            else:
                unexpected.append(f"{entry.name}/")
        elif not _is_checkpoint_file(entry.name):
            unexpected.append(entry.name)
    return unexpected


def _is_checkpoint_file(name: str) -> bool:
    return any(fnmatch(name, pattern) for pattern in CHECKPOINT_FILE_PATTERNS)


# --------------------------------------------------------------------------------- staging names and stale folders
@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    """Names this machine and pid namespace, so a pid in a staging name is only ever judged where it means that
    process (another host or container sharing the disk keeps its folders)."""
    ident = socket.gethostname()
    with suppress(OSError):
        ident += f"/{os.stat('/proc/self/ns/pid').st_ino}"
    return hashlib.sha1(ident.encode()).hexdigest()[:8]


def work_folder_prefix(target: Path, kind: str, pid: int | None = None) -> str:
    """``.<name>.tmp-<host>-<pid>-`` (staging) or ``.<name>.old-<host>-<pid>-`` (backup); a random part follows."""
    return f".{target.name}.{kind}-{_host_tag()}-{os.getpid() if pid is None else pid}-"


def _work_folder_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(target.name)}\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-.+$")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")  # a zombie has finished


def _process_start_time(pid: int) -> float | None:
    """Wall-clock start of ``pid`` (Linux /proc), or None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _creator_gone(path: Path, pid: int) -> bool:
    """True when the process that made ``path`` has ended: its pid is dead, or now belongs to a process started
    after ``path`` was last modified (a reused pid). A live creator's folder is never judged stale."""
    if not _pid_alive(pid):
        return True
    started = _process_start_time(pid)
    try:
        modified = path.lstat().st_mtime
    except OSError:
        return False
    return started is not None and modified < started - 2.0  # btime has 1 s resolution


def _clean_stale_work_folders(target: Path) -> bool:
    """Remove this target's staging and backup folders whose creator is gone; put back a backup whose target is
    missing (a save killed between its two renames). Returns True when a previous checkpoint was put back."""
    pattern = _work_folder_pattern(target)
    stale = []
    with suppress(OSError):
        for entry in os.scandir(target.parent):
            match = pattern.match(entry.name)
            if match is None or match["host"] != _host_tag():
                continue
            path = Path(entry.path)
            if _creator_gone(path, int(match["pid"])):
                stale.append((match["kind"], path))
    restored = False
    # newest backup first: if the target is missing, it is the checkpoint to put back
    stale.sort(key=lambda item: (item[0] != "old", -_mtime(item[1])))
    for kind, path in stale:
        if kind == "old" and not os.path.lexists(target):
            os.rename(path, target)
            restored = True
            logger.warning("put back %s from %s, left by an interrupted save", target, path.name)
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed %s, left by an interrupted save", path)
    return restored


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


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
    try:
        yield staging
        _apply_default_modes(staging)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        error = _write_error(target, exc)
        if error is not None:
            raise error from exc
        raise
    try:
        with _commit_lock(target):
            _commit(staging, target, overwrite=overwrite, inputs=inputs)
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


# ------------------------------------------------------------------------------------------------ save_pruned
def save_pruned(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    tokenizer=None,
    stock_format: bool = False,
    overwrite: bool = False,
    extra_files: Mapping[str, str | bytes | dict] | None = None,
    before_commit: Callable[[Path], None] | None = None,
    max_shard_size: str | int = "5GB",
    fused_weights: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Save a pruned model (plus tokenizer and extra files) atomically.

    Args:
        model: a model returned by ``prune_experts`` or ``DiEPPruner.prune_model``.
        save_directory: the folder to create.
        tokenizer: saved beside the weights when given.
        stock_format: save as the stock family architecture (no remote code). Only possible when every layer
            keeps the same number of experts; checked before anything is written.
        overwrite: replace an existing non-empty folder (atomically) that looks like a checkpoint.
        extra_files: name -> text, bytes, or a dict written as JSON (reports, recipes, cards).
        before_commit: called with the staging folder after everything is written (used for checks).
        fused_weights: write experts as fused tensors (``experts.gate_up_proj``) instead of the family's original
            per-expert keys (``experts.3.w1.weight``); both load, the per-expert form is what the Hub's base
            checkpoints and most serving engines use.
        inputs: files the run read (recipe, calibration data...): the output folder may not contain them.

    Raises:
        DiEPError: the folder is refused (see :func:`check_output_folder`), another process saved there first,
            or writing failed (disk full...); nothing is left behind and a previous checkpoint is unchanged.
    """
    started = time.perf_counter()
    if stock_format and uniform_expert_count(model) is None:
        to_stock_model(model)  # raises the explanatory error
    if not stock_format and not is_pruned(model):
        raise DiEPError(
            f"{type(model).__name__} is not a pruned model; prune it with prune_experts/DiEPPruner first, or "
            "use model.save_pretrained for an unmodified model"
        )
    with atomic_directory(save_directory, overwrite=overwrite, inputs=inputs) as staging:
        to_save = to_stock_model(model) if stock_format else model
        to_save.save_pretrained(staging, max_shard_size=max_shard_size, save_original_format=not fused_weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, content in (extra_files or {}).items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Mapping):
                path.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n")
            elif isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        if not stock_format:
            missing = [name for name in REMOTE_CODE_FILES if not (staging / name).is_file()]
            if missing:
                raise DiEPError(f"remote code files {missing} were not written; the checkpoint would not load")
        if before_commit is not None:
            before_commit(staging)
    logger.info(
        "saved %s checkpoint to %s in %.1fs",
        "stock" if stock_format else "diep",
        save_directory,
        time.perf_counter() - started,
    )
    return Path(save_directory)
