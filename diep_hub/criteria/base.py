"""One interface for every expert-scoring criterion (diep, reap, frequency, soft_frequency, naee, random).

A criterion turns a model and calibration tokens into a score per (MoE layer, expert): higher means more
important. Selection (``diep_hub.selection``) turns scores into a keep map; surgery applies it. Criteria never
modify model weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..families import MoEFamily, MoELayer


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
        options: criterion-specific settings (e.g. DiEP's search hyper-parameters), already validated.
    """

    model: nn.Module
    family: MoEFamily
    layers: list[MoELayer]
    input_ids: torch.Tensor | None
    batch_size: int = 8
    seed: int = 0
    num_to_keep: dict[int, int] | None = None
    options: dict[str, Any] = field(default_factory=dict)


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
    """Base class: subclasses set ``name``, ``reference`` (paper URL) and implement ``score``."""

    name: ClassVar[str]
    reference: ClassVar[str] = ""
    #: whether ``score`` needs ``ScoringContext.num_to_keep``
    needs_target_counts: ClassVar[bool] = False

    @abstractmethod
    def score(self, context: ScoringContext) -> ScoreResult: ...

    def check_feasible(self, context: ScoringContext) -> None:
        """Refuse a request this criterion cannot serve, before calibration data is loaded.

        ``context.input_ids`` is None here. The default accepts everything; NAEE checks its subset counts.
        """
        return None


_CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make a criterion available by its ``name``."""
    if cls.name in _CRITERIA:
        raise ValueError(f"criterion {cls.name!r} is registered twice")
    _CRITERIA[cls.name] = cls
    return cls


def available_criteria() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(name: str) -> type[Criterion]:
    try:
        return _CRITERIA[name]
    except KeyError:
        raise ConfigError(f"method {name!r} is not a known criterion; choose one of {available_criteria()}") from None
