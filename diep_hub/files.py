"""Reading the small text files of a checkpoint or a run (JSON, YAML) with errors that name the file.

A truncated ``config.json`` or a hand-edited ``recipe.yaml`` should end in one message that says which file is
broken and where, not in a ``JSONDecodeError`` traceback from deep inside a command.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import CorruptFileError


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The file's text as UTF-8; a file in another encoding is a :class:`CorruptFileError` naming the byte."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CorruptFileError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); save it as UTF-8"
        ) from None


def _parse(path: str | os.PathLike, what: str, kind: str, parse, error: type[Exception], explain) -> Any:
    """``parse`` the file's text; a ``error`` becomes a :class:`CorruptFileError` naming the file, with
    ``explain(exc)`` (where and what) after it."""
    path = Path(path)
    text = read_text(path, what)
    try:
        return parse(text)
    except error as exc:
        raise CorruptFileError(f"{what} {path} is not valid {kind} {explain(exc)}") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; malformed JSON is a :class:`CorruptFileError` with the file, line and column."""
    return _parse(path, what, "JSON", json.loads, json.JSONDecodeError, lambda exc: (
        f"({exc.msg} at line {exc.lineno}, column {exc.colno}); restore it or re-save the checkpoint"))


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    """Like :func:`read_json`, and the top level must be an object (every file diep_hub writes is one)."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise CorruptFileError(f"{what} {path} holds a JSON {type(value).__name__}, expected an object {{...}}")
    return value


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """Parse a YAML file safely; a syntax error names the file, line and column."""
    import yaml

    return _parse(path, what, "YAML", yaml.safe_load, yaml.YAMLError, _yaml_problem)


def _yaml_problem(exc) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"({problem}{where})"


__all__ = ["read_json", "read_json_object", "read_text", "read_yaml"]
