"""Soft frequency ("Expert Trimming", He et al. 2024): the router's average probability for each expert.

Formula: s_j^(l) = (1 / |X|) * sum_{x in X} p_j^(l)(x), with p^(l)(x) = softmax(router_logits^(l)(x)) over ALL of
the layer's experts (not only the chosen top-k), averaged over every calibration token x. Reference: He et al.,
"Demystifying the Compression of Mixture-of-Experts Through a Unified Framework", https://arxiv.org/abs/2406.02500.

Sigmoid routers (DeepSeek-V3) score each expert independently, so there is no softmax distribution; we use the
normalised sigmoid scores p_j = sigmoid(z_j) / sum_i sigmoid(z_i) (the selection-only
``e_score_correction_bias`` is not included: it balances load, it is not a routing probability).
"""

from __future__ import annotations

import torch

from ..families import ROUTER_ACTIVATIONS
from .base import ScoreResult, ScoringContext, register_criterion
from .capture import RoutingRecord, RoutingStatisticCriterion, expert_accumulators


def router_probabilities(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Per-token probability over all experts, for the family's router activation (``MoEFamily.router_activation``):
    softmax of the logits, or normalised sigmoid scores."""
    logits = logits.float()
    if activation == "sigmoid":
        scores = torch.sigmoid(logits)
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    if activation == "softmax":
        return torch.softmax(logits, dim=-1)
    raise ValueError(f"router activation {activation!r} is not one of {list(ROUTER_ACTIVATIONS)}")


@register_criterion
class SoftFrequencyCriterion(RoutingStatisticCriterion):
    """Mean full-distribution router probability per expert."""

    name = "soft_frequency"
    reference = "https://arxiv.org/abs/2406.02500"
    pass_label = "soft frequency"

    def statistic(self, context: ScoringContext):
        activation = context.family.router_activation
        sums = expert_accumulators(context)

        def accumulate(record: RoutingRecord) -> None:
            probs = router_probabilities(record.router_logits, activation)
            sums[record.layer.index] += probs.sum(dim=0).to("cpu", torch.float64)

        def finish(tokens: int) -> ScoreResult:
            scores = {index: (s / tokens).to(torch.float32) for index, s in sums.items()}
            sigmoid = activation == "sigmoid"
            ranking = "mean normalised sigmoid router score" if sigmoid else "mean softmax router probability"
            return ScoreResult(scores=scores, ranking=ranking, details={"tokens": tokens, "router": activation})

        return accumulate, finish
