"""Every declared runtime dependency is used by the package, and none is declared for show (issue 14, point 14).

A dependency that nothing imports is an install every user carries for nothing (optimum was one: the pruner
follows the shape of its quantizers but nothing of it runs). A package used only through another library's call
(jinja2 renders cards inside huggingface_hub's ``ModelCard.from_template``) names that call here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diep_hub"

# distribution name -> the module it installs, where the two differ
MODULE_OF = {"huggingface_hub": "huggingface_hub", "pyyaml": "yaml"}
# distribution -> (file in diep_hub, the call through which it is used)
USED_THROUGH = {"jinja2": ("card/modelcard.py", ".from_template(")}  # huggingface_hub renders with jinja2


def _declared() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower() for requirement in project["dependencies"]]


def _imported_modules() -> set[str]:
    pattern = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)
    modules: set[str] = set()
    for source in PACKAGE.rglob("*.py"):
        modules.update(pattern.findall(source.read_text(encoding="utf-8")))
    return modules


def test_every_declared_dependency_is_used():
    imported = _imported_modules()
    unused = []
    for distribution in _declared():
        if distribution in USED_THROUGH:
            relative, call = USED_THROUGH[distribution]
            if call not in (PACKAGE / relative).read_text(encoding="utf-8"):
                unused.append(f"{distribution} (expected {call} in diep_hub/{relative})")
            continue
        if MODULE_OF.get(distribution, distribution.replace("-", "_")) not in imported:
            unused.append(distribution)
    assert unused == []


def test_optimum_is_not_declared():
    assert "optimum" not in _declared()
