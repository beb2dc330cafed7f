"""Fault catalogue of saving: nothing is lost on save, whatever goes wrong or whoever else writes there.

Rows: two processes racing into one folder, output folders that must never be replaced (the working directory, a
folder holding it, a git work tree, a folder holding an input, a folder that is not a checkpoint), a full disk
(a real 640 KiB tmpfs). Every row checks the error and what is on disk afterwards: the previous checkpoint
byte for byte, and no staging, backup or lock entry left beside the target.
"""

from __future__ import annotations

import errno
import functools
import multiprocessing
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

import diep_hub
from diep_hub.checkpoint import atomic
from diep_hub.checkpoint.atomic import atomic_directory
from diep_hub.checkpoint.folders import check_output_folder, work_folder_prefix
from diep_hub.errors import ConfigError, DiEPError
from tests.helpers.fault_catalogue import Fault, check_fault, ids
from tests.helpers.tiny_models import tiny_model


@functools.cache
def _model(experts: int = 3):
    """A pruned tiny Mixtral; ``experts`` per layer sets its size on disk (2: ~260 KB, 8: ~720 KB)."""
    return diep_hub.prune_experts(tiny_model("mixtral"), {i: list(range(experts)) for i in range(4)})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _work_entries(parent: Path, name: str) -> list[str]:
    """Staging, backup and lock entries of ``name`` left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _saved(folder: Path, experts: int = 3) -> dict[str, bytes]:
    diep_hub.save_pruned(_model(experts), folder)
    return _files(folder)


# ------------------------------------------------------------------------------------------------ race
def _racer(target: str, writer: int, overwrite: bool, barrier, results) -> None:
    """One of two processes saving into ``target``; both wait at the barrier once fully staged."""
    try:
        diep_hub.save_pruned(
            _model(),
            target,
            overwrite=overwrite,
            extra_files={"writer.json": {"writer": writer}},
            before_commit=lambda staging: barrier.wait(60),
        )
        results.put((writer, "ok", ""))
    except BaseException as exc:  # reported to the parent, which asserts on it
        results.put((writer, type(exc).__name__, str(exc)))


def _race(target: Path, overwrite: bool) -> list[tuple[int, str, str]]:
    context = multiprocessing.get_context("fork")  # the model is built once, in the parent
    _model()
    barrier, results = context.Barrier(2), context.Queue()
    procs = [context.Process(target=_racer, args=(str(target), i, overwrite, barrier, results)) for i in (0, 1)]
    for proc in procs:
        proc.start()
    outcomes = sorted(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    return outcomes


def _race_new_folder(ctx):
    outcomes = _race(ctx["target"], overwrite=False)
    winners = [o for o in outcomes if o[1] == "ok"]
    losers = [o for o in outcomes if o[1] != "ok"]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert losers[0][1] == "DiEPError", outcomes
    ctx["winner"] = winners[0][0]
    raise DiEPError(losers[0][2])


def _winner_intact(ctx):
    target = ctx["target"]
    files = _files(target)
    assert files["writer.json"].decode().strip() == f'{{\n  "writer": {ctx["winner"]}\n}}'
    expected = dict(ctx["reference"], **{"writer.json": files["writer.json"]})
    assert files == expected  # the winner's checkpoint, whole: not mixed with the loser's, not deleted
    assert _work_entries(ctx["tmp_path"], "out") == []


def _race_setup(tmp_path):
    reference = _saved(tmp_path / "reference")  # what a single save writes, for comparison
    return {"target": tmp_path / "out", "reference": reference}


# --------------------------------------------------------------------------------------- refused folders
def _checkpoint_with(tmp_path, name, extra: dict[str, str]):
    target = tmp_path / name
    _saved(target)
    for rel, text in extra.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_text(text)
    return {"target": target, "before": _files(target)}


def _unchanged(ctx):
    target = ctx["target"]
    assert _files(target) == ctx["before"]
    assert _work_entries(target.parent, target.name) == []


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
    return {"target": target, "before": _files(target)}


def _file_setup(tmp_path):
    (tmp_path / "out").write_text("x")
    return {"target": tmp_path / "out"}


def _file_untouched(ctx):
    assert ctx["target"].read_text() == "x"
    assert _work_entries(ctx["tmp_path"], "out") == []


def _save(ctx, **kwargs):
    return diep_hub.save_pruned(_model(), ctx.get("path", ctx["target"]), overwrite=True, **kwargs)


def _user_file_appears_setup(tmp_path):
    return _checkpoint_with(tmp_path, "out", {})


def _user_file_appears(ctx):
    def someone_writes(staging):
        (ctx["target"] / "notes.txt").write_text("written while the save ran")

    _save(ctx, before_commit=someone_writes)


def _user_file_kept(ctx):
    target = ctx["target"]
    assert _files(target) == dict(ctx["before"], **{"notes.txt": b"written while the save ran"})
    assert _work_entries(target.parent, target.name) == []


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
    before = _saved(disk / "out", experts=2)  # ~260 KB fits; the 8-expert save (~720 KB) does not, beside it
    return {"disk": disk, "target": disk / "out", "before": before}


def _previous_intact(ctx):
    assert _files(ctx["target"]) == ctx["before"]
    assert sorted(p.name for p in ctx["disk"].iterdir()) == ["out"]


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
    Fault(
        id="output-is-cwd",
        setup=_cwd_setup,
        call=lambda ctx: diep_hub.save_pruned(_model(), ".", overwrite=True),
        error=ConfigError,
        words=["work", "current working directory"],
        on_disk=_unchanged,
    ),
    Fault(
        id="output-contains-cwd",
        setup=_parent_of_cwd_setup,
        call=_save,
        error=ConfigError,
        words=["project", "contains the current working directory", "assets"],
        on_disk=_unchanged,
    ),
    Fault(
        id="output-holds-git",
        setup=lambda tmp_path: _checkpoint_with(tmp_path, "repo", {".git/HEAD": "ref: refs/heads/main\n"}),
        call=_save,
        error=ConfigError,
        words=["repo", "git repository (.git)"],
        on_disk=_unchanged,
    ),
    Fault(
        id="output-contains-an-input",
        setup=lambda tmp_path: _checkpoint_with(tmp_path, "out", {"recipe.yaml": "model: {id: x}\n"}),
        call=lambda ctx: _save(ctx, inputs=[ctx["target"] / "recipe.yaml"]),
        error=ConfigError,
        words=["out", "recipe.yaml", "an input of this run"],
        on_disk=_unchanged,
    ),
    Fault(
        id="output-contains-an-input-folder",
        setup=lambda tmp_path: _checkpoint_with(tmp_path, "out", {"assets/calib.png": "x"}),
        call=lambda ctx: _save(ctx, inputs=[ctx["target"] / "assets"]),
        error=ConfigError,
        words=["out", "assets", "an input of this run"],
        on_disk=_unchanged,
    ),
    Fault(
        id="overwrite-refuses-non-checkpoint",
        setup=lambda tmp_path: _checkpoint_with(
            tmp_path, "out", {f"data{i}.csv": "1,2\n" for i in range(6)} | {"notes/a.md": "x", "assets/x.csv": "x"}
        ),
        call=_save,
        error=ConfigError,
        words=["out", "does not look like a checkpoint", "assets/x.csv", "data0.csv", "and 3 more", "overwrite=True"],
        on_disk=_unchanged,
    ),
    Fault(
        id="overwrite-refuses-folder-without-config",
        setup=lambda tmp_path: _folder_with(tmp_path, {"model.safetensors": "x", "tokenizer.json": "{}"}),
        call=_save,
        error=ConfigError,
        words=["out", "no config.json"],
        on_disk=_unchanged,
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
        call=lambda ctx: diep_hub.save_pruned(_model(8), ctx["target"]),
        error=DiEPError,
        words=["disk/out", "No space left", "nothing was saved"],
        on_disk=_nothing_on_disk,
    ),
    Fault(
        id="full-disk-overwrite-keeps-previous",
        setup=_full_disk_overwrite_setup,
        call=lambda ctx: diep_hub.save_pruned(_model(8), ctx["target"], overwrite=True),
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


# --------------------------------------------------------------------------------------------- success paths
def test_racing_overwrites_leave_one_whole_checkpoint(tmp_path):
    reference = _saved(tmp_path / "reference")
    target = tmp_path / "out"
    _saved(target)
    outcomes = _race(target, overwrite=True)
    assert [o[1] for o in outcomes] == ["ok", "ok"]  # last writer wins, atomically
    files = _files(target)
    assert files == dict(reference, **{"writer.json": files["writer.json"]})
    assert _work_entries(tmp_path, "out") == []


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(done.stdout)
    assert not Path(f"/proc/{pid}").exists() or os.name != "posix"
    return pid


def test_stale_staging_and_backups_are_cleaned_but_live_ones_kept(tmp_path):
    target = tmp_path / "out"
    _saved(target)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(0.2)
        dead, live = _dead_pid(), sleeper.pid
        folders = {
            "dead-staging": tmp_path / (work_folder_prefix(target, "tmp", dead) + "a1"),
            "dead-backup": tmp_path / (work_folder_prefix(target, "old", dead) + "b2"),
            "live-staging": tmp_path / (work_folder_prefix(target, "tmp", live) + "c3"),
            "live-backup": tmp_path / (work_folder_prefix(target, "old", live) + "c4"),
            "reused-pid-staging": tmp_path / (work_folder_prefix(target, "tmp", live) + "d5"),
            "other-host": tmp_path / f".out.tmp-00000000-{dead}-e6",
            "other-name": tmp_path / (work_folder_prefix(tmp_path / "other", "tmp", dead) + "f7"),
        }
        for folder in folders.values():
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"partial")
        hour_ago = time.time() - 3600  # before the live process started: the pid was reused since
        os.utime(folders["reused-pid-staging"], (hour_ago, hour_ago))

        diep_hub.save_pruned(_model(), target, overwrite=True)

        left = {name for name, folder in folders.items() if folder.exists()}
        assert left == {"live-staging", "live-backup", "other-host", "other-name"}
        for name in left:
            assert (folders[name] / "model.safetensors").read_bytes() == b"partial"
        assert _files(target) == _saved(tmp_path / "reference")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_backup_of_an_interrupted_overwrite_is_put_back(tmp_path):
    """kill -9 between the two renames of an overwrite leaves only the backup: the next save restores it."""
    target = tmp_path / "out"
    before = _saved(target)
    backup = tmp_path / (work_folder_prefix(target, "old", _dead_pid()) + "a1")
    target.rename(backup)
    with pytest.raises(ConfigError, match="already exists and is not empty; pass overwrite=True"):
        diep_hub.save_pruned(_model(), target)
    assert _files(target) == before and not backup.exists()
    assert _work_entries(tmp_path, "out") == []


@pytest.mark.parametrize("umask, dirs, files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_modes_follow_the_umask(tmp_path, umask, dirs, files):
    previous = os.umask(umask)
    try:
        diep_hub.save_pruned(_model(), tmp_path / "out", extra_files={"assets/fig.png": b"png", "README.md": "c"})
    finally:
        os.umask(previous)
    target = tmp_path / "out"
    found = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in target.rglob("*")}
    found["out"] = stat.S_IMODE(target.stat().st_mode)
    assert "out/model.safetensors" in found and "out/assets" in found
    expected = {name: dirs if (tmp_path / name).is_dir() else files for name in found}
    assert found == expected


def test_check_output_folder_accepts_checkpoints_and_empty_folders(tmp_path):
    """What overwrite=True may replace: an empty folder, a checkpoint with its card, figures, eval results and
    tokenizer files; and a new folder needs nothing."""
    assert check_output_folder(tmp_path / "new", overwrite=False) == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty", overwrite=False) == (tmp_path / "empty").resolve()
    ckpt = tmp_path / "ckpt"
    _saved(ckpt)
    for rel in ("README.md", "assets/experts_per_layer.png", ".eval_results/mmlu.yaml", "tokenizer.json",
                "tokenizer.model", "merges.txt", "chat_template.jinja", ".cache/huggingface/download/x.metadata"):
        (ckpt / rel).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / rel).write_text("x")
    assert check_output_folder(ckpt, overwrite=True, inputs=[tmp_path / "recipe.yaml"]) == ckpt.resolve()


def test_atomic_directory_block_error_passes_through_and_leaves_nothing(tmp_path):
    with pytest.raises(KeyError, match="boom"), atomic_directory(tmp_path / "out") as staging:
        (staging / "config.json").write_text("{}")
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []
