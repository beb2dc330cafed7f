"""Saving and reading back small pruned checkpoints, and two processes racing a save, for the saving tests
(test_faults_saving.py, test_saving_atomic.py)."""

from __future__ import annotations

import functools
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import diep_hub
from tests.helpers.tiny_models import tiny_model


@functools.cache
def pruned_tiny(experts: int = 3):
    """A pruned tiny Mixtral; ``experts`` per layer sets its size on disk (2: ~260 KB, 8: ~720 KB)."""
    return diep_hub.prune_experts(tiny_model("mixtral"), {i: list(range(experts)) for i in range(4)})


def read_files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def work_entries(parent: Path, name: str) -> list[str]:
    """Staging, backup and lock entries of ``name`` left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def save_and_read(folder: Path, experts: int = 3) -> dict[str, bytes]:
    diep_hub.save_pruned(pruned_tiny(experts), folder)
    return read_files(folder)


def _racer(target: str, writer: int, overwrite: bool, barrier, results) -> None:
    """One of two processes saving into ``target``; both wait at the barrier once fully staged."""
    try:
        diep_hub.save_pruned(
            pruned_tiny(),
            target,
            overwrite=overwrite,
            extra_files={"writer.json": {"writer": writer}},
            before_commit=lambda staging: barrier.wait(60),
        )
        results.put((writer, "ok", ""))
    except BaseException as exc:  # reported to the parent, which asserts on it
        results.put((writer, type(exc).__name__, str(exc)))


def race(target: Path, overwrite: bool) -> list[tuple[int, str, str]]:
    """Two forked processes save into ``target`` at once; their sorted (writer, outcome, message)."""
    context = multiprocessing.get_context("fork")  # the model is built once, in the parent
    pruned_tiny()
    barrier, results = context.Barrier(2), context.Queue()
    procs = [context.Process(target=_racer, args=(str(target), i, overwrite, barrier, results)) for i in (0, 1)]
    for proc in procs:
        proc.start()
    outcomes = sorted(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    return outcomes


def dead_pid() -> int:
    """The id of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(done.stdout)
    assert not Path(f"/proc/{pid}").exists() or os.name != "posix"
    return pid
