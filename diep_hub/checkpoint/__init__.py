"""A pruned checkpoint on disk: its file names, its report, its format, saving it, reading it back.

Modules (import from them directly). This ``__init__`` loads only ``layout``; ``PruningReport``, ``Calibration``
and ``experts_table`` are imported from ``report`` on first use, so reading a file name costs no torch import.

- ``layout``: every file name of a checkpoint folder, defined once (``REPORT_FILE``, ``RECIPE_FILE``...).
- ``report``: :class:`PruningReport`, ``pruning_report.json`` typed, read and written in one place.
- ``format``: the ``diep_<family>`` config/class switch and the stock-architecture conversion.
- ``folders``, ``atomic``, ``saving``: which output folders may be written, atomic writes, ``save_pruned``.
- ``inspect``: reading a folder or Hub snapshot back (``inspect_checkpoint``, ``read_checkpoint_metadata``).
- ``reproduce``: re-running the recorded recipe and comparing (imports the runner, so nothing here imports it).
- ``upload``: the files ``push`` would send and what it refuses to send.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .layout import (
    CARD_FILE,
    CONFIG_FILE,
    EVAL_FILE,
    EVAL_RESULTS_DIR,
    EXPERTS_FIGURE,
    PRUNER_CONFIG_FILE,
    RECIPE_FILE,
    REPORT_FILE,
    SCORES_FIGURE,
)

_LAZY = {"Calibration": "report", "PruningReport": "report", "experts_table": "report"}

if TYPE_CHECKING:
    from .report import Calibration, PruningReport, experts_table


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "EVAL_FILE",
    "EVAL_RESULTS_DIR",
    "EXPERTS_FIGURE",
    "PRUNER_CONFIG_FILE",
    "RECIPE_FILE",
    "REPORT_FILE",
    "SCORES_FIGURE",
    "Calibration",
    "PruningReport",
    "experts_table",
]
