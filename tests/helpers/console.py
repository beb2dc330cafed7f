"""The ``diep-hub`` console script run in a fresh process, and the examples its help shows (tests/test_cli_*.py,
tests/test_help_examples.py)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_console(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed console script in a fresh process (offline env comes from conftest)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    exe = shutil.which("diep-hub")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "diep_hub.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def help_examples() -> list[list[str]]:
    """The `diep-hub ...` commands of every epilog (main and subcommands), in order, without duplicates, as argv
    lists; shell continuation lines are joined and `a && b` gives two."""
    import argparse

    from diep_hub.cli.parser import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    examples: list[list[str]] = []
    for text in [parser.epilog or ""] + [p.epilog or "" for p in sub.choices.values()]:
        for line in text.replace("\\\n", " ").splitlines():
            for command in line.split("&&"):
                command = command.split("#")[0].strip()
                if command.startswith("diep-hub ") and "<" not in command and "|" not in command:
                    argv = shlex.split(command)[1:]
                    if argv not in examples:
                        examples.append(argv)
    return examples
