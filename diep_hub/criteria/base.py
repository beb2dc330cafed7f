"""One interface for every expert-scoring criterion (diep, diep_removal, reap, frequency,
soft_frequency, naee, random, validated_choice).

A criterion turns a model and calibration tokens into a score per (MoE layer, expert): higher means more
important. Selection (``diep_hub.selection``) turns scores into a keep map; surgery applies it. Criteria never
modify model weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import ValidationError
from torch import nn

from ..errors import ConfigError
from ..families import MoEFamily, MoELayer
from ..options import CriterionOptions, NoOptions, problems
from ..selection import MODES as SELECTION_MODES

#: Selection modes whose per-layer kept counts are fixed before scoring (they do not depend on the scores), so a
#: criterion that searches subsets of given sizes (``needs_target_counts``) can be told those sizes up front.
COUNTS_BEFORE_SCORING = ("uniform",)


@dataclass
class ScoringContext:
    """Everything a criterion may use.

    Attributes:
        model: the model to score (weights frozen; a criterion must leave them bit-identical).
        family: its adapter.
        layers: the MoE layers to score, in depth order.
        input_ids: calibration tokens, [num_samples, seq_len] (long).
        batch_size: sequences a forward pass.
        seed: for anything random.
        num_to_keep: experts each layer will keep, when the criterion needs it (NAEE searches subsets of that
            size); None when not known in advance.
        sparsity: the run's target sparsity, for criteria whose search depends on it (``needs_sparsity``).
        options: the fields of the criterion's options model (``Criterion.options``, e.g. DiEP's search
            hyper-parameters) plus the run settings it reads (``progress``); read with ``parse_options``.
        select: the run's selection (sparsity, mode, floors, caps, group rules) as a function of scores ->
            ``diep_hub.selection.Selection``, for criteria that compare keep maps (``validated_choice``); its
            keyword ``mode`` ("global" / "uniform") overrides the run's mode and nothing else. None when the caller
            scores without a run (most criteria never read it).
    """

    model: nn.Module
    family: MoEFamily
    layers: list[MoELayer]
    input_ids: torch.Tensor | None
    batch_size: int = 8
    seed: int = 0
    num_to_keep: dict[int, int] | None = None
    sparsity: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    select: Callable[..., Any] | None = None


@dataclass
class ScoreResult:
    """Scores per layer (tensor [num_experts] on CPU, float32) plus anything worth reporting.

    ``details`` is JSON-serialisable: it goes into pruning_report.json (e.g. alpha, beta, loss curve, counts).
    ``ranking`` names how the scores were formed, e.g. "softmax(alpha)*beta".
    """

    scores: dict[int, torch.Tensor]
    ranking: str
    details: dict[str, Any] = field(default_factory=dict)


class Criterion(ABC):
    """Base class: subclasses set ``name``, ``reference`` (paper URL) and implement ``score``.

    ``options`` is the criterion's typed options model (``diep_hub.options.CriterionOptions``: defaults, ranges,
    one-line docs), registered with it as PEFT pairs a method with its config class: ``DiEPPruner`` and the recipe
    validate a method's options with it. A new criterion is one module here (its options model, its class with
    ``@register_criterion``) plus its import line in ``diep_hub/criteria/__init__.py``.

    ``selections`` declares the selection modes (``diep_hub.selection.MODES``) whose keep map is the one the
    criterion's scores mean; the first is the default when none is asked for. A criterion that searches subsets of
    given sizes (``needs_target_counts``) may only declare modes in ``COUNTS_BEFORE_SCORING``: any other mode would
    redistribute the counts after the search and keep subsets it never evaluated. ``selection_reason`` says why
    a mode is missing; it goes into the refusal.
    """

    name: ClassVar[str]
    reference: ClassVar[str] = ""
    #: the typed options model (``diep_hub.options.CriterionOptions``): defaults, ranges, one-line docs
    options: ClassVar[type[CriterionOptions]] = NoOptions
    #: whether ``score`` needs ``ScoringContext.num_to_keep``
    needs_target_counts: ClassVar[bool] = False
    #: whether ``score`` needs ``ScoringContext.sparsity`` (its scores then hold for that sparsity only)
    needs_sparsity: ClassVar[bool] = False
    #: the selection modes this criterion supports, the default first
    selections: ClassVar[tuple[str, ...]] = ("global", "uniform")
    #: why some selection modes are not supported (empty when all are)
    selection_reason: ClassVar[str] = ""

    @classmethod
    def default_selection(cls) -> str:
        """The selection used when none is given: the first declared."""
        return cls.selections[0]

    @abstractmethod
    def score(self, context: ScoringContext) -> ScoreResult: ...

    def check_feasible(self, context: ScoringContext) -> None:
        """Refuse a request this criterion cannot serve, before calibration data is loaded.

        ``context.input_ids`` is None here. The default accepts everything; NAEE checks its subset counts.
        """
        return None


_CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make a criterion available by its ``name``; its ``selections`` declaration is checked here,
    so a criterion whose keep map selection could silently change never becomes available."""
    if cls.name in _CRITERIA:
        raise ValueError(f"criterion {cls.name!r} is registered twice")
    declared = cls.selections
    if (
        not isinstance(declared, tuple)
        or not declared
        or len(set(declared)) != len(declared)
        or not set(declared) <= set(SELECTION_MODES)
    ):
        raise ValueError(
            f"criterion {cls.name!r} declares selections={declared!r}; expected a non-empty tuple of distinct modes "
            f"from {list(SELECTION_MODES)}"
        )
    if cls.needs_target_counts and not set(declared) <= set(COUNTS_BEFORE_SCORING):
        raise ValueError(
            f"criterion {cls.name!r} searches subsets of given sizes (needs_target_counts) but declares "
            f"selections={declared!r}; only {list(COUNTS_BEFORE_SCORING)} fix the per-layer counts before scoring"
        )
    if not (isinstance(cls.options, type) and issubclass(cls.options, CriterionOptions)):
        raise ValueError(
            f"criterion {cls.name!r} declares options={cls.options!r}; expected a subclass of "
            "diep_hub.options.CriterionOptions (NoOptions when it takes none)"
        )
    _CRITERIA[cls.name] = cls
    return cls


def parse_options(cls: type[Criterion], options: dict[str, Any] | None, runtime: dict[str, Any]):
    """A criterion's options from ``ScoringContext.options``: (its options model, the run settings).

    ``runtime`` names the run settings a criterion also reads from the dict, with their defaults (``progress``;
    NAEE also ``regroup``); any other key must be a field of ``cls.options``. Errors are ConfigErrors in the
    ``field: value -> allowed`` words of the API and the recipe.
    """
    options = dict(options or {})
    fields = {f.alias or n for n, f in cls.options.model_fields.items()} | set(cls.options.model_fields)
    unknown = sorted(set(options) - fields - set(runtime))
    if unknown:
        allowed = sorted(set(cls.options.model_fields) | set(runtime))
        raise ConfigError(f"unknown {cls.name} option(s) {unknown}; allowed: {allowed}")
    settings = {k: options.pop(k, default) for k, default in runtime.items()}
    try:
        return cls.options.model_validate(options), settings
    except ValidationError as exc:
        raise ConfigError(f"invalid {cls.name} options: " + "; ".join(problems(exc, cls.options))) from None


def available_criteria() -> list[str]:
    """The registered method names (importing ``diep_hub.criteria``, this module's package, registers them all)."""
    return sorted(_CRITERIA)


def get_criterion(name: str) -> type[Criterion]:
    try:
        return _CRITERIA[name]
    except KeyError:
        raise ConfigError(f"method {name!r} is not a known criterion; choose one of {available_criteria()}") from None


def selection_problem(method: str, selection: str) -> str | None:
    """Why ``method`` cannot be combined with ``selection`` (None when it can): the one wording of the refusal,
    used by ``DiEPPruner`` and by the recipe's ``pruning.selection`` check alike.

    Unknown methods and unknown modes are left to their own checks (None here).
    """
    cls = _CRITERIA.get(method)
    if cls is None or selection not in SELECTION_MODES or selection in cls.selections:
        return None
    allowed = ", ".join(f"selection={mode!r}" for mode in cls.selections)
    reason = f" ({cls.selection_reason})" if cls.selection_reason else ""
    return (
        f"method={method!r} does not support selection={selection!r}{reason}; allowed with {method}: {allowed}"
    )
