"""Fault catalogue of saving: nothing is lost on save, whatever goes wrong or whoever else writes there.

Rows: two processes racing into one folder, output folders that must never be replaced (the working directory, a
folder holding it, a git work tree, a folder holding an input, a folder that is not a checkpoint), a full disk
(a real 640 KiB tmpfs). Every row checks the error and what is on disk afterwards: the previous checkpoint
byte for byte, and no staging, backup or lock entry left beside the target. Saves that succeed under the same
pressures are in test_saving_atomic.py.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from unittest import mock

import pytest

import diep_hub
from diep_hub.checkpoint import atomic
from diep_hub.errors import ConfigError, DiEPError
from tests.helpers.fault_catalogue import Fault, check_fault, ids
from tests.helpers.saving import pruned_tiny, race, read_files, save_and_read, work_entries


# ------------------------------------------------------------------------------------------------ race
def _race_new_folder(ctx):
    outcomes = race(ctx["target"], overwrite=False)
    winners = [o for o in outcomes if o[1] == "ok"]
    losers = [o for o in outcomes if o[1] != "ok"]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert losers[0][1] == "DiEPError", outcomes
    ctx["winner"] = winners[0][0]
    raise DiEPError(losers[0][2])


def _winner_intact(ctx):
    target = ctx["target"]
    files = read_files(target)
    assert files["writer.json"].decode().strip() == f'{{\n  "writer": {ctx["winner"]}\n}}'
    expected = dict(ctx["reference"], **{"writer.json": files["writer.json"]})
    assert files == expected  # the winner's checkpoint, whole: not mixed with the loser's, not deleted
    assert work_entries(ctx["tmp_path"], "out") == []


def _race_setup(tmp_path):
    reference = save_and_read(tmp_path / "reference")  # what a single save writes, for comparison
    return {"target": tmp_path / "out", "reference": reference}


# --------------------------------------------------------------------------------------- refused folders
def _checkpoint_with(tmp_path, name, extra: dict[str, str]):
    target = tmp_path / name
    save_and_read(target)
    for rel, text in extra.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_text(text)
    return {"target": target, "before": read_files(target)}


def _unchanged(ctx):
    target = ctx["target"]
    assert read_files(target) == ctx["before"]
    assert work_entries(target.parent, target.name) == []


def _cwd_setup(tmp_path):
    ctx = _checkpoint_with(tmp_path, "work", {"notes.md": "my notes"})
    os.chdir(ctx["target"])  # restored by the test
    return ctx


def _parent_of_cwd_setup(tmp_path):
    ctx = _checkpoint_with(tmp_path, "project", {})
    (ctx["target"] / "assets").mkdir()
    os.chdir(ctx["target"] / "assets")
    return ctx


def _folder_with(tmp_path, files: dict[str, str]):
    target = tmp_path / "out"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
    return {"target": target, "before": read_files(target)}


def _file_setup(tmp_path):
    (tmp_path / "out").write_text("x")
    return {"target": tmp_path / "out"}


def _file_untouched(ctx):
    assert ctx["target"].read_text() == "x"
    assert work_entries(ctx["tmp_path"], "out") == []


def _save(ctx, **kwargs):
    return diep_hub.save_pruned(pruned_tiny(), ctx.get("path", ctx["target"]), overwrite=True, **kwargs)


def _user_file_appears_setup(tmp_path):
    return _checkpoint_with(tmp_path, "out", {})


def _user_file_appears(ctx):
    def someone_writes(staging):
        (ctx["target"] / "notes.txt").write_text("written while the save ran")

    _save(ctx, before_commit=someone_writes)


def _user_file_kept(ctx):
    target = ctx["target"]
    assert read_files(target) == dict(ctx["before"], **{"notes.txt": b"written while the save ran"})
    assert work_entries(target.parent, target.name) == []


def _rename_into_target_fails(ctx):
    """The new checkpoint cannot be renamed into place (after the old one was moved aside): the old one returns."""
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if ".out.tmp-" in os.fspath(src):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst, *args, **kwargs)

    with mock.patch.object(atomic.os, "rename", rename):
        _save(ctx)


# ------------------------------------------------------------------------------------------------ full disk
_MOUNTS: list[Path] = []


def _tmpfs(path: Path, size: str = "640k") -> Path:
    path.mkdir()
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("a real full disk needs a small tmpfs, and mounting one needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip() or result.returncode}")
    _MOUNTS.append(path)
    return path


def _full_disk_new_setup(tmp_path):
    disk = _tmpfs(tmp_path / "disk")
    return {"disk": disk, "target": disk / "out"}


def _nothing_on_disk(ctx):
    assert list(ctx["disk"].iterdir()) == []


def _full_disk_overwrite_setup(tmp_path):
    disk = _tmpfs(tmp_path / "disk")
    before = save_and_read(disk / "out", experts=2)  # ~260 KB fits; the 8-expert save (~720 KB) does not, beside it
    return {"disk": disk, "target": disk / "out", "before": before}


def _previous_intact(ctx):
    assert read_files(ctx["target"]) == ctx["before"]
    assert sorted(p.name for p in ctx["disk"].iterdir()) == ["out"]


def _refused(id: str, setup, words: list[str], call=_save) -> Fault:
    """A folder save_pruned must refuse (ConfigError) and leave byte for byte as it was, no work entry beside it."""
    return Fault(id=id, setup=setup, call=call, error=ConfigError, words=words, on_disk=_unchanged)


SAVE_FAULTS = [
    Fault(
        id="race-two-processes-into-one-new-folder",
        setup=_race_setup,
        call=_race_new_folder,
        error=DiEPError,
        words=["out", "appeared during the save", "overwrite=True"],
        on_disk=_winner_intact,
    ),
    Fault(
        id="overwrite-target-gets-user-file-during-save",
        setup=_user_file_appears_setup,
        call=_user_file_appears,
        error=ConfigError,
        words=["out", "does not look like a checkpoint", "notes.txt"],
        on_disk=_user_file_kept,
    ),
    Fault(
        id="overwrite-commit-rename-fails-puts-previous-back",
        setup=_user_file_appears_setup,
        call=_rename_into_target_fails,
        error=DiEPError,
        words=["could not save the checkpoint", "out", "Input/output error", "unchanged"],
        on_disk=_unchanged,
    ),
    _refused(
        "output-is-cwd",
        _cwd_setup,
        ["work", "current working directory"],
        call=lambda ctx: diep_hub.save_pruned(pruned_tiny(), ".", overwrite=True),
    ),
    _refused(
        "output-contains-cwd",
        _parent_of_cwd_setup,
        ["project", "contains the current working directory", "assets"],
    ),
    _refused(
        "output-holds-git",
        lambda tmp_path: _checkpoint_with(tmp_path, "repo", {".git/HEAD": "ref: refs/heads/main\n"}),
        ["repo", "git repository (.git)"],
    ),
    _refused(
        "output-contains-an-input",
        lambda tmp_path: _checkpoint_with(tmp_path, "out", {"recipe.yaml": "model: {id: x}\n"}),
        ["out", "recipe.yaml", "an input of this run"],
        call=lambda ctx: _save(ctx, inputs=[ctx["target"] / "recipe.yaml"]),
    ),
    _refused(
        "output-contains-an-input-folder",
        lambda tmp_path: _checkpoint_with(tmp_path, "out", {"assets/calib.png": "x"}),
        ["out", "assets", "an input of this run"],
        call=lambda ctx: _save(ctx, inputs=[ctx["target"] / "assets"]),
    ),
    _refused(
        "overwrite-refuses-non-checkpoint",
        lambda tmp_path: _checkpoint_with(
            tmp_path, "out", {f"data{i}.csv": "1,2\n" for i in range(6)} | {"notes/a.md": "x", "assets/x.csv": "x"}
        ),
        ["out", "does not look like a checkpoint", "assets/x.csv", "data0.csv", "and 3 more", "overwrite=True"],
    ),
    _refused(
        "overwrite-refuses-folder-without-config",
        lambda tmp_path: _folder_with(tmp_path, {"model.safetensors": "x", "tokenizer.json": "{}"}),
        ["out", "no config.json"],
    ),
    Fault(
        id="output-is-a-file",
        setup=_file_setup,
        call=_save,
        error=ConfigError,
        words=["out", "is a file"],
        on_disk=_file_untouched,
    ),
    Fault(
        id="full-disk-new-folder",
        setup=_full_disk_new_setup,
        call=lambda ctx: diep_hub.save_pruned(pruned_tiny(8), ctx["target"]),
        error=DiEPError,
        words=["disk/out", "No space left", "nothing was saved"],
        on_disk=_nothing_on_disk,
    ),
    Fault(
        id="full-disk-overwrite-keeps-previous",
        setup=_full_disk_overwrite_setup,
        call=lambda ctx: diep_hub.save_pruned(pruned_tiny(8), ctx["target"], overwrite=True),
        error=DiEPError,
        words=["disk/out", "No space left", "unchanged"],
        on_disk=_previous_intact,
    ),
]


@pytest.mark.parametrize("row", SAVE_FAULTS, ids=ids(SAVE_FAULTS))
def test_save_fault(row, tmp_path):
    cwd = os.getcwd()
    try:
        error = check_fault(row, tmp_path)
        if "full-disk" in row.id:  # the SafetensorError / OSError is kept as the cause
            assert type(error.__cause__).__name__ in ("SafetensorError", "OSError")
    finally:
        os.chdir(cwd)
        while _MOUNTS:
            subprocess.run(["umount", str(_MOUNTS.pop())], check=True)


