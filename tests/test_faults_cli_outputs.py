"""The CLI's error boundary where results go: a full disk while saving, output folders that must not be written or
replaced (a file in the way, no permission, the working directory, a git checkout, a folder holding the recipe), and
a push whose connection drops mid-commit. One stderr line, exit code 2, and the disk left as it was.
"""

from __future__ import annotations

import errno
import os

import pytest
from safetensors import SafetensorError

from tests.helpers.cli_faults import (
    OUT,
    PatchedCliFault,
    check_row,
    copy_run,
    disk_full,
    git_checkout,
    in_work_dir,
    nothing_written,
    out_only,
    prune_tiny,
    recipe_inside,
    run_recipe_setup,
    unwritable_dir,
    work_kept,
    write,
)
from tests.helpers.fault_catalogue import CliFault, check_cli_fault, ids

pytestmark = pytest.mark.usefixtures("untrained_tiny_cli")

ROWS: list[CliFault] = [
    # --- a full disk while saving (saving.py converts the safetensors error)
    *[
        PatchedCliFault(
            id=f"prune-disk-full-{name}",
            setup=out_only,
            argv=prune_tiny,
            words=[OUT, "No space left on device"],
            on_disk=nothing_written,
            patch=disk_full(error),
        )
        for name, error in (
            ("safetensors", SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                            'message: "No space left on device" })')),
            ("oserror", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors")),
        )
    ],
    # --- output folders (the runner's checks; saving.check_output_folder for the rest)
    CliFault(
        id="run-output-parent-is-a-file",
        setup=lambda tmp: {**run_recipe_setup(tmp), "blocker": write(tmp / "blocker", "x"),
                           "out": tmp / "blocker" / "out"},
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"])],
        words=["blocker", "is a file", "--output"],
        on_disk=lambda c: (c["blocker"].read_text() == "x") or pytest.fail("blocker changed"),
    ),
    CliFault(
        id="run-output-not-writable",
        setup=lambda tmp: {**run_recipe_setup(tmp), "out": unwritable_dir(tmp) / "diep-hub-out"},
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"])],
        words=["diep-hub-out", "cannot write", "--output"],
        on_disk=lambda c: not c["out"].exists() or pytest.fail(f"{c['out']} was created"),
    ),
    PatchedCliFault(
        id="run-output-is-the-working-directory",
        setup=run_recipe_setup,
        argv=lambda c: ["run", str(c["recipe"]), "--output", ".", "--overwrite"],
        words=["working directory"],
        on_disk=work_kept,
        patch=in_work_dir,
    ),
    PatchedCliFault(
        id="run-output-contains-the-working-directory",
        setup=run_recipe_setup,
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["work"]), "--overwrite"],
        words=["working directory", "work"],
        on_disk=work_kept,
        patch=lambda mp, tmp: (in_work_dir(mp, tmp), mp.chdir(tmp / "work" / "sub")),
    ),
    CliFault(
        id="run-output-holds-git",
        setup=lambda tmp: {**run_recipe_setup(tmp), "out": git_checkout(tmp / "repo")},
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"]), "--overwrite"],
        words=["repo", ".git"],
        on_disk=lambda c: (c["out"] / ".git" / "HEAD").is_file() or pytest.fail(".git removed"),
    ),
    CliFault(
        id="run-output-holds-the-recipe",
        setup=lambda tmp: recipe_inside(tmp / "out"),
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"]), "--overwrite"],
        words=["recipe.yaml", "out"],
        on_disk=lambda c: c["recipe"].is_file() or pytest.fail("the recipe was deleted"),
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=ids(ROWS))
def test_cli_fault(row, request, tmp_path, monkeypatch):
    check_row(row, request, tmp_path, monkeypatch)


def test_push_connection_dropped_mid_commit(run_folder, hub_server, tmp_path, monkeypatch):
    """The server closes the connection while the commit is sent: one line naming the repo (hub.py's PushError)."""
    repo = f"{hub_server.user}/tiny-dropped"
    hub_server.faults["commit"] = "drop"
    row = CliFault(
        id="push-connection-dropped-mid-commit",
        setup=lambda tmp: {"folder": copy_run(tmp)},
        argv=lambda c: ["push", repo, str(c["folder"])],
        words=[repo, "commit"],
        env={"HF_TOKEN": hub_server.token},
    )
    check_cli_fault(row, tmp_path, monkeypatch)
    assert ("commit", "drop") in hub_server.fault_hits
    assert hub_server.token not in repr(hub_server.fault_hits)
