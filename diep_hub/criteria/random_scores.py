"""Random scores: the floor every real criterion must beat.

Formula: s_j^(l) ~ U[0, 1), independently per (layer, expert), drawn from ``torch.Generator().manual_seed(seed)``
layer by layer in depth order, so the same seed always gives the same scores (and the same keep map).
Reference: the random-pruning baseline of NAEE (Lu et al. 2024, https://arxiv.org/abs/2402.14800) and DiEP
(https://arxiv.org/abs/2509.16105). No calibration data is used.
"""

from __future__ import annotations

import torch

from .base import Criterion, ScoreResult, ScoringContext, parse_options, register_criterion


@register_criterion
class RandomCriterion(Criterion):
    """Seeded uniform random scores; ignores the calibration tokens."""

    name = "random"
    reference = "https://arxiv.org/abs/2402.14800"

    def score(self, context: ScoringContext) -> ScoreResult:
        parse_options(type(self), context.options, {"progress": True})  # no options of its own
        generator = torch.Generator().manual_seed(int(context.seed))
        scores = {
            layer.index: torch.rand(layer.num_experts, generator=generator, dtype=torch.float32)
            for layer in context.layers
        }
        return ScoreResult(scores=scores, ranking="uniform random U[0,1)", details={"seed": int(context.seed)})
