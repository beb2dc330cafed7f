"""Reading a recipe file: the file checks, YAML that refuses a key given twice, and the errors that name the line.

:func:`read_recipe_file` returns the parsed data; :func:`diep_hub.recipe.load_recipe` validates it against the
schema. Kept apart from the schema so that each reads in one sitting.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .files import read_text


class RecipeError(ConfigError):
    """A recipe file is missing, unreadable, or fails validation; the message lists every problem at once."""

    def __init__(self, source: str, problems: list[str], *, title: str | None = None):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        head = title or f"invalid recipe {source} ({len(self.problems)} problem(s))"
        super().__init__(f"{head}:\n{lines}")


def shipped_recipes() -> dict[str, Path]:
    """Recipes shipped with the package (the top-level ``recipes/`` folder), by name without ``.yaml``."""
    root = resources.files("diep_hub.recipes")
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping (raised by :class:`UniqueKeyLoader`, turned into a RecipeError)."""

    def __init__(self, field: str, first: yaml.Mark, second: yaml.Mark):
        self.field, self.first, self.second = field, first, second
        super().__init__(f"{field}: duplicate key at line {second.line + 1} (first at line {first.line + 1})")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    Plain PyYAML keeps the last value: a second ``pruning:`` block would silently replace the first, and a recipe
    would run with settings its author never saw. Merge keys (``<<: *anchor``) may still be overridden.
    """

    #: field path (``("pruning", "search", "lr")``) -> line (1-based) of its key, filled while parsing
    lines: dict[tuple[str, ...], int]

    def get_single_data(self):
        node = self.get_single_node()
        self.lines = {}
        if node is None:
            return None
        self._paths: dict[int, tuple[str, ...]] = {}
        self._index(node, ())
        return self.construct_document(node)

    def _index(self, node, path: tuple[str, ...]) -> None:
        """Remember each mapping's field path (``pruning.search``) so a duplicate is named in full, and the line
        of every key, so a validation problem is named with its line."""
        if id(node) in self._paths:
            return  # an alias of a node already seen (or a recursive anchor)
        if isinstance(node, yaml.MappingNode):
            self._paths[id(node)] = path
            for key, value in node.value:
                child = (*path, str(key.value)) if isinstance(key, yaml.ScalarNode) else path
                self.lines.setdefault(child, key.start_mark.line + 1)
                self._index(value, child)
        elif isinstance(node, yaml.SequenceNode):
            self._paths[id(node)] = path
            for i, value in enumerate(node.value):
                self.lines.setdefault((*path, str(i)), value.start_mark.line + 1)
                self._index(value, (*path, str(i)))

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: the base class reports it
                    continue
                if first is not None:
                    field = ".".join((*getattr(self, "_paths", {}).get(id(node), ()), str(key)))
                    raise _DuplicateKey(field, first, key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def parse_recipe_text(text: str, source: str = "<recipe>") -> Any:
    """Parse recipe YAML with :class:`UniqueKeyLoader`; syntax errors and duplicate keys name the line."""
    return parse_recipe_lines(text, source)[0]


def parse_recipe_lines(text: str, source: str = "<recipe>") -> tuple[Any, dict[tuple[str, ...], int]]:
    """:func:`parse_recipe_text`, and the line of every key by its field path (:attr:`UniqueKeyLoader.lines`)."""
    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data(), loader.lines
    except _DuplicateKey as exc:
        raise RecipeError(
            source,
            [f"{exc.field}: key given twice, at line {exc.first.line + 1} and again at line {exc.second.line + 1} "
             "-> give each key once (YAML would silently keep only the last)"],
            title=f"cannot parse recipe {source}",
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise RecipeError(source, [f"yaml: {detail}{where}"], title=f"cannot parse recipe {source}") from None
    finally:
        loader.dispose()


def line_of(path: str, lines: dict[tuple[str, ...], int]) -> int | None:
    """The line of a problem's field path (``pruning.search.lr``): its own key's, else the nearest enclosing
    section's that the file has (a missing key is reported at its section)."""
    parts = tuple(path.split("."))
    while parts:
        if parts in lines:
            return lines[parts]
        parts = parts[:-1]
    return None


def read_recipe_file(path: str | os.PathLike) -> tuple[Any, Path]:
    """The parsed YAML of a recipe file and the file it came from; a bare name (``tiny``) finds a shipped recipe.

    :func:`read_recipe_with_lines` also gives the line of every key.
    """
    data, file, _ = read_recipe_with_lines(path)
    return data, file


def read_recipe_with_lines(path: str | os.PathLike) -> tuple[Any, Path, dict[tuple[str, ...], int]]:
    """:func:`read_recipe_file`, and the line of every key by its field path (for the problems' line numbers).

    Raises:
        RecipeError: a missing file, a folder, an unreadable file, malformed YAML, a duplicated key or an empty
            file.
        CorruptFileError: the file is not UTF-8 text (the message names the byte and line).
    """
    file = Path(path)
    if not file.exists():
        shipped = shipped_recipes()
        name = str(path).removesuffix(".yaml")
        if name in shipped and os.sep not in name:
            file = shipped[name]
        else:
            names = ", ".join(sorted(shipped)) or "none"
            raise RecipeError(
                str(path),
                [f"file: {str(path)!r} does not exist -> an existing YAML file, or a shipped recipe: {names}"],
                title=f"cannot read recipe {path}",
            )
    if file.is_dir():
        raise RecipeError(str(path), [f"file: {str(path)!r} is a folder -> a YAML recipe file"],
                          title=f"cannot read recipe {path}")
    try:
        text = read_text(file, "recipe")
    except OSError as exc:
        raise RecipeError(str(path), [f"file: {str(path)!r} cannot be read ({exc.strerror or exc})"],
                          title=f"cannot read recipe {path}") from None
    data, lines = parse_recipe_lines(text, str(path))
    if data is None:
        raise RecipeError(str(path), ["<top level>: the file is empty -> a mapping with a 'model' section"])
    return data, file, lines


__all__ = ["RecipeError", "UniqueKeyLoader", "line_of", "parse_recipe_lines", "parse_recipe_text", "read_recipe_file",
           "read_recipe_with_lines", "shipped_recipes"]
