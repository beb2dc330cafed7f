"""Expert-scoring criteria behind one interface; importing this package registers every one of them.

Each criterion is one module whose docstring gives its formula and paper: diep (the DiEP search), diep_removal
(the removal-aware search), reap, frequency, soft_frequency, naee, random, and validated_choice (the candidate whose
keep map stays closest to the unpruned model on held-out calibration tokens). Shared capture machinery (hooks over
calibration passes) is in ``capture``; selection of experts from scores is in ``diep_hub.selection``.
"""

from . import (  # noqa: F401  (importing registers each criterion)
    choice,
    diep,
    frequency,
    naee,
    random_scores,
    reap,
    removal,
    soft_frequency,
)
from .base import (
    Criterion,
    ScoreResult,
    ScoringContext,
    available_criteria,
    get_criterion,
    register_criterion,
    selection_problem,
)

__all__ = [
    "Criterion",
    "ScoreResult",
    "ScoringContext",
    "available_criteria",
    "get_criterion",
    "register_criterion",
    "selection_problem",
]
