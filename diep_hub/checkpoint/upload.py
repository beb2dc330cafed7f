"""What ``push`` uploads from a checkpoint folder, and what it refuses to upload.

Everything here reads the folder only; nothing touches the network. :func:`check_folder` lists the files to upload
and refuses a folder that would not load from the Hub; :func:`check_no_token_sent` refuses to send the token.

Symlinks: a link whose fully resolved target is a regular file inside the folder is followed (the file is
uploaded under the link's name). A link to a path outside the folder, to a directory, or to nothing is refused:
uploading it would publish a file that is not part of the checkpoint.

Pickles: ``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl`` and ``*.pickle`` files run arbitrary code when loaded with
``torch.load`` / ``pickle``; they are refused unless ``allow_pickle=True`` (diep_hub writes safetensors only).

The token: every file to upload is scanned whole, whatever its size or type (weights included), as are the commit
message and the file names; the messages name the file, never the token.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path

from ..errors import DiEPError
from ..files import read_json_object
from .layout import CONFIG_FILE, EVAL_RESULTS_DIR, REPORT_FILE

logger = logging.getLogger(__name__)

# Never uploaded: caches, temp folders of atomic saves, VCS data.
IGNORED = (".git/*", ".git", "__pycache__/*", "*/__pycache__/*", "*.pyc", ".cache/*", ".*.tmp-*", ".*.old-*",
           ".DS_Store")
# Pickle-based files: loading one runs arbitrary code, so they are only uploaded when asked for.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth")
_SCAN_CHUNK = 1024 * 1024  # the token scan reads files in chunks of this size (with an overlap)


class PushError(DiEPError):
    """Publishing refused or failed; the message names the repo and what to do next (never the token)."""


def _ignored(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pattern) for pattern in IGNORED) or any(
        part.startswith(".") and part != EVAL_RESULTS_DIR for part in rel.split("/")[:-1]
    )


def _ignored_dir(rel: str) -> bool:
    """A directory all of whose files are ignored: not walked (and links to it are never uploaded)."""
    name = rel.rsplit("/", 1)[-1]
    return (name.startswith(".") and name != EVAL_RESULTS_DIR) or name == "__pycache__" or _ignored(rel + "/x")


def _check_link(path: Path, rel: str, root: Path) -> None:
    """Refuse a symlink unless it resolves to a regular file inside the folder (see the module docstring)."""
    target = os.readlink(path)
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise PushError(
            f"{rel} is a symlink to {target}, which does not exist; delete the link or copy the file in its place"
        ) from None
    if not resolved.is_relative_to(root):
        where = target if Path(target) == resolved else f"{target} ({resolved})"
        raise PushError(
            f"{rel} is a symlink to {where}, outside the folder {root}: its content is not part of "
            "the checkpoint and is not uploaded; copy the file into the folder in place of the link if it belongs "
            "in the upload, or delete the link"
        )
    if not resolved.is_file():
        raise PushError(
            f"{rel} is a symlink to {target}, which is not a regular file (links to directories are not "
            "followed); copy the directory into the folder in place of the link, or delete the link"
        )


def upload_files(folder: Path) -> list[str]:
    """Paths (posix, relative) of the files that would be uploaded; refuses symlinks that escape the folder."""
    root = folder.resolve()
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        base = Path(dirpath)
        rel_dir = base.relative_to(folder).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        walk_into = []
        for name in sorted(dirnames):
            rel = prefix + name
            if _ignored_dir(rel):
                continue
            if (base / name).is_symlink():
                _check_link(base / name, rel, root)  # always refuses: a link to a directory
            walk_into.append(name)
        dirnames[:] = walk_into
        for name in sorted(filenames):
            rel, path = prefix + name, base / name
            if _ignored(rel):
                continue
            if path.is_symlink():
                _check_link(path, rel, root)
            elif not path.is_file():
                logger.warning("%s is not a regular file (fifo, socket or device): it is not uploaded", rel)
                continue
            out.append(rel)
    return sorted(out)


def _check_pickles(folder: Path, files: list[str], allow_pickle: bool) -> None:
    pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    if not pickles:
        if not has_safetensors:
            raise PushError(f"{folder} has no weights (*.safetensors); the upload would not load")
        return
    if allow_pickle:
        logger.warning("uploading pickle files %s (allow_pickle=True): loading them runs arbitrary code", pickles)
        if not has_safetensors and not any(f.lower().endswith(PICKLE_WEIGHT_SUFFIXES) for f in pickles):
            raise PushError(f"{folder} has no weights (*.safetensors or pickled *.bin); the upload would not load")
        return
    why = ("pickle files run arbitrary code when loaded (torch.load / pickle.load), so diep_hub does not upload "
           "them unless asked: pass allow_pickle=True to upload them anyway")
    if has_safetensors:
        raise PushError(
            f"{folder} has pickle files {pickles} next to the *.safetensors weights; {why}, or delete them "
            "(the safetensors files already hold the weights)"
        )
    raise PushError(
        f"{folder} has only pickle weights {pickles} and no *.safetensors; {why}, or re-save the checkpoint as "
        "safetensors (save_pruned / model.save_pretrained)"
    )


def check_folder(folder: str | os.PathLike, *, allow_pickle: bool = False) -> list[str]:
    """The files that would be uploaded; refuse a folder that would not load from the Hub, has symlinks out of
    the folder, pickles (unless ``allow_pickle``), or a corrupt ``config.json`` / ``pruning_report.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder; save the pruned model first (save_pruned / DiEPPruner.save)")
    files = upload_files(folder)
    if CONFIG_FILE not in files:
        raise PushError(f"{folder} has no {CONFIG_FILE}: it is not a model checkpoint")
    _check_pickles(folder, files, allow_pickle)
    config = read_json_object(folder / CONFIG_FILE, "model config")
    if REPORT_FILE in files:
        from .report import PruningReport  # torch, through to_jsonable: only when there is a report to check

        PruningReport.read(folder / REPORT_FILE)
    auto_map = config.get("auto_map") or {}
    if not isinstance(auto_map, dict):
        raise PushError(f"{folder}/{CONFIG_FILE}: auto_map is a {type(auto_map).__name__}, expected an object "
                        "{'AutoConfig': 'module.Class', ...}; re-save the checkpoint")
    refs = [ref for ref in auto_map.values() if isinstance(ref, str) and "--" not in ref]  # "repo--mod.Cls": remote
    needed = sorted({ref.split(".")[0] + ".py" for ref in refs})
    missing = [name for name in needed if name not in files]
    if missing:
        raise PushError(f"{folder}: {CONFIG_FILE} auto_map needs {missing}, which are missing; re-save the checkpoint")
    return files


def _file_contains(path: Path, needle: bytes) -> bool:
    """Stream the file in chunks; the last ``len(needle) - 1`` bytes of a chunk are kept so that a needle split
    across two chunks is found."""
    keep = len(needle) - 1
    tail = b""
    with open(path, "rb") as fh:
        while chunk := fh.read(_SCAN_CHUNK):
            window = tail + chunk
            if needle in window:
                return True
            tail = window[-keep:] if keep else b""  # the whole window while it is shorter than keep
    return False


def check_no_token_sent(folder: Path, files: list[str], token: str, message: str) -> None:
    """Refuse if the token is in anything the push sends: a file (every byte, any size or type), a file name or
    the commit message. The messages name the file, never the token."""
    if token in message:
        raise PushError("the commit message contains your Hugging Face token; remove it (nothing was uploaded)")
    needle = token.encode()
    total = sum((folder / rel).stat().st_size for rel in files)
    logger.info("checking %d files (%.1f MiB) for the token before uploading", len(files), total / 2**20)
    for rel in files:
        if token in rel:
            raise PushError("a file name in the folder contains your Hugging Face token; rename it "
                            "(nothing was uploaded)")
        if _file_contains(folder / rel, needle):
            raise PushError(f"{rel} contains your Hugging Face token; remove it before pushing (nothing was uploaded)")


__all__ = ["PushError", "check_folder", "check_no_token_sent", "upload_files"]
