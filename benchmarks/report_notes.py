"""Generated reports with hand notes: a re-run rewrites the tables and keeps what people wrote below the marker.

Every report opens alike (:func:`header`): its title, the commands that made its results, the machine."""

from __future__ import annotations

import sys
from pathlib import Path

NOTES_MARKER = "<!-- notes: hand-written below this line, kept when the tables are regenerated -->"


def write_keeping_notes(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` followed by the notes part of the file it replaces (from the marker on), or by a
    bare marker where that file has none, so that hand notes always have their place."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else NOTES_MARKER + "\n"
    path.write_text(text + "\n" + notes, encoding="utf-8")


def publish(report: str | None, text: str) -> None:
    """A benchmark's report: into the markdown file ``report`` (its hand notes kept), or to stdout without one."""
    if report:
        write_keeping_notes(report, text)
    else:
        print(text)


def header(title: str, commands: list[str], machine: str) -> list[str]:
    """A report's first lines: the title, the commands that made its results files and the machine they ran on."""
    return [f"# {title}", "", "Commands: " + ", ".join(f"`{c}`" for c in commands) + "  ", f"Machine: {machine}.  "]


def this_command() -> str:
    """The command running now, as a report quotes it: ``python benchmarks/SCRIPT ARGS``."""
    return f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])


def with_this_command(old_meta: dict, meta: dict) -> dict:
    """A results file's new ``meta``: ``meta`` plus the commands recorded in ``old_meta`` and, once, the command
    running now (:func:`this_command`), so the report can say which commands made its results."""
    commands, command = old_meta.get("commands", []), this_command()
    return {**meta, "commands": commands + ([command] if command not in commands else [])}
