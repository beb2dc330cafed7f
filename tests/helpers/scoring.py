"""A criterion's scoring context over a whole model, built as the pruner builds it, for tests that call a criterion
directly (its family looked up, every MoE layer in depth order, progress bars off)."""

from __future__ import annotations

from typing import Any

import torch

from diep_hub.criteria.base import ScoreResult, ScoringContext, get_criterion
from diep_hub.families import get_family


def scoring_context(
    model,
    input_ids: torch.Tensor | None,
    *,
    batch_size: int,
    seed: int = 0,
    keep: int | None = None,
    sparsity: float | None = None,
    options: dict[str, Any] | None = None,
) -> ScoringContext:
    """``keep``: experts every layer keeps (``num_to_keep``), for criteria that search fixed counts."""
    family = get_family(model)
    layers = family.moe_layers(model)
    return ScoringContext(
        model=model,
        family=family,
        layers=layers,
        input_ids=input_ids,
        batch_size=batch_size,
        seed=seed,
        num_to_keep=None if keep is None else {layer.index: keep for layer in layers},
        sparsity=sparsity,
        options={"progress": False, **(options or {})},
    )


def score(name: str, context: ScoringContext) -> ScoreResult:
    """Run the registered criterion ``name`` on ``context``."""
    return get_criterion(name)().score(context)
