"""The fault catalogue: one row a bad input or fault, run through one shared check.

Every ``tests/test_faults_*.py`` module is a table of :class:`Fault` rows (API calls) or :class:`CliFault` rows
(``diep-hub`` invocations). A row says what to set up, the call, the error it must end in, the words its message
must contain (the file, field or value, and what is allowed), and what must be on disk afterwards. The checks
here are the only place that decides what "ended well" means:

- API: the expected exception class, every word in its message, nothing on disk that should not be there.
- CLI: exit code 2, exactly one line on stderr, starting ``diep-hub <command>: error:``, every word in it, no
  traceback; with ``-v`` the traceback is shown.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# setup(tmp_path) -> context handed to the call and to on_disk (a dict of whatever the row needs).
Setup = Callable[[Path], dict[str, Any]]


@dataclass(frozen=True)
class Fault:
    """One API case: ``call(ctx)`` must raise ``error`` whose message contains every word of ``words``."""

    id: str
    setup: Setup
    call: Callable[[dict[str, Any]], Any]
    error: type[BaseException] | tuple[type[BaseException], ...]
    words: Sequence[str]
    on_disk: Callable[[dict[str, Any]], None] | None = None  # assertions on files after the failure

    def __str__(self) -> str:
        return self.id


@dataclass(frozen=True)
class CliFault:
    """One CLI case: ``diep-hub <argv(ctx)>`` must exit 2 with one stderr line containing every word."""

    id: str
    setup: Setup
    argv: Callable[[dict[str, Any]], list[str]]
    words: Sequence[str]
    on_disk: Callable[[dict[str, Any]], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    exit_code: int = 2

    def __str__(self) -> str:
        return self.id


def ids(rows: Sequence[Fault | CliFault]) -> list[str]:
    return [row.id for row in rows]


def _assert_words(message: str, words: Sequence[str], row_id: str) -> None:
    missing = [w for w in words if w.lower() not in message.lower()]
    assert not missing, f"[{row_id}] message lacks {missing}: {message!r}"


def check_fault(row: Fault, tmp_path: Path) -> BaseException:
    """Run an API row; return the raised exception after checking class, words and disk."""
    ctx = row.setup(tmp_path)
    ctx.setdefault("tmp_path", tmp_path)
    with pytest.raises(row.error) as caught:
        row.call(ctx)
    _assert_words(str(caught.value), row.words, row.id)
    if row.on_disk is not None:
        row.on_disk(ctx)
    return caught.value


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch | None = None, env: dict[str, str] | None = None):
    """Run ``diep_hub.cli.main`` in-process, capturing stdout and stderr (logs included)."""
    from diep_hub import cli

    if monkeypatch is not None:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
    out, err = io.StringIO(), io.StringIO()
    library_logger = logging.getLogger("diep_hub")
    # cli.main gives the "diep_hub" logger a terminal handler and stops propagation; put back what was there, or a
    # session fixture calling this would leave later tests' caplog blind to the library's records.
    saved = (list(library_logger.handlers), library_logger.level, library_logger.propagate)
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse errors
            code = int(exc.code or 0)
        finally:
            for handler in library_logger.handlers:
                handler.flush()
            library_logger.handlers[:], library_logger.level, library_logger.propagate = saved
    return CliResult(code=code, stdout=out.getvalue(), stderr=err.getvalue())


_ERROR_LINE = re.compile(r"^diep-hub [\w-]+: error: .+")


def error_lines(stderr: str) -> list[str]:
    """stderr lines that are not log records (``LEVEL name: ...``) or progress bars."""
    lines = []
    for line in stderr.split("\n"):  # not splitlines(): it splits on tqdm's "\r" redraws too
        if re.match(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) ", line) or "\r" in line or not line.strip():
            continue
        lines.append(line)
    return lines


def check_cli_fault(row: CliFault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliResult:
    """Run a CLI row: exit code, one error line with the words, no traceback, then the disk check."""
    ctx = row.setup(tmp_path)
    ctx.setdefault("tmp_path", tmp_path)
    result = run_cli(row.argv(ctx), monkeypatch, row.env)
    assert result.code == row.exit_code, f"[{row.id}] exit {result.code}, stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, f"[{row.id}] traceback shown without -v:\n{result.stderr}"
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and _ERROR_LINE.match(lines[0]), f"[{row.id}] want one error line, got:\n{result.stderr}"
    _assert_words(lines[0], row.words, row.id)
    if row.on_disk is not None:
        row.on_disk(ctx)
    return result
