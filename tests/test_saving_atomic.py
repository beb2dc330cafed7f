"""Atomic saving that succeeds under pressure: racing overwrites leave one whole checkpoint, stale staging and
backup folders of dead processes are cleaned (live ones kept), an interrupted overwrite's backup is put back, saved
modes follow the umask, and what overwrite=True may replace. The failures are rows of test_faults_saving.py.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

import diep_hub
from diep_hub.checkpoint.atomic import atomic_directory
from diep_hub.checkpoint.folders import check_output_folder, work_folder_prefix
from diep_hub.errors import ConfigError
from tests.helpers.saving import dead_pid, pruned_tiny, race, read_files, save_and_read, work_entries


def test_racing_overwrites_leave_one_whole_checkpoint(tmp_path):
    reference = save_and_read(tmp_path / "reference")
    target = tmp_path / "out"
    save_and_read(target)
    outcomes = race(target, overwrite=True)
    assert [o[1] for o in outcomes] == ["ok", "ok"]  # last writer wins, atomically
    files = read_files(target)
    assert files == dict(reference, **{"writer.json": files["writer.json"]})
    assert work_entries(tmp_path, "out") == []


def test_stale_staging_and_backups_are_cleaned_but_live_ones_kept(tmp_path):
    target = tmp_path / "out"
    save_and_read(target)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(0.2)
        dead, live = dead_pid(), sleeper.pid
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

        diep_hub.save_pruned(pruned_tiny(), target, overwrite=True)

        left = {name for name, folder in folders.items() if folder.exists()}
        assert left == {"live-staging", "live-backup", "other-host", "other-name"}
        for name in left:
            assert (folders[name] / "model.safetensors").read_bytes() == b"partial"
        assert read_files(target) == save_and_read(tmp_path / "reference")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_backup_of_an_interrupted_overwrite_is_put_back(tmp_path):
    """kill -9 between the two renames of an overwrite leaves only the backup: the next save restores it."""
    target = tmp_path / "out"
    before = save_and_read(target)
    backup = tmp_path / (work_folder_prefix(target, "old", dead_pid()) + "a1")
    target.rename(backup)
    with pytest.raises(ConfigError, match="already exists and is not empty; pass overwrite=True"):
        diep_hub.save_pruned(pruned_tiny(), target)
    assert read_files(target) == before and not backup.exists()
    assert work_entries(tmp_path, "out") == []


@pytest.mark.parametrize("umask, dirs, files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_modes_follow_the_umask(tmp_path, umask, dirs, files):
    previous = os.umask(umask)
    try:
        diep_hub.save_pruned(pruned_tiny(), tmp_path / "out", extra_files={"assets/fig.png": b"png", "README.md": "c"})
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
    save_and_read(ckpt)
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
