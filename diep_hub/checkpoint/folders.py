"""The output folder of a save: which folders may be written or replaced, and the work folders beside them.

- :func:`check_output_folder` runs before anything is written: never the working directory or a folder holding
  it, a git work tree, or a folder holding one of the run's inputs; with ``overwrite=True`` only an empty folder or
  one that looks like a checkpoint is replaced;
- staging (``.<name>.tmp-<host>-<pid>-<random>``) and backup (``.<name>.old-...``) folders left by a killed save
  are removed by the next save into the same parent once their creator is gone (a backup whose target is missing
  is the previous checkpoint: it is put back instead).

The atomic save that uses them is :mod:`diep_hub.checkpoint.atomic`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterable
from contextlib import suppress
from fnmatch import fnmatch
from pathlib import Path

from ..errors import ConfigError
from .layout import CHECKPOINT_SUBFOLDERS

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


__all__ = ["CHECKPOINT_FILE_PATTERNS", "check_output_folder", "work_folder_prefix"]
