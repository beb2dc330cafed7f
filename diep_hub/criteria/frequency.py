"""Frequency: how often the router picks each expert.

Formula: s_j^(l) = #{(token x, slot s) : topk_index_s^(l)(x) = j} over all calibration tokens, i.e. the number of
times expert j is among the top-k of layer l. Experts the router never chooses score 0. Reference: the
frequency-based pruning baseline used by NAEE (Lu et al. 2024, https://arxiv.org/abs/2402.14800) and REAP
(Lasby et al., https://arxiv.org/abs/2510.13999). ``details["tokens"]`` is the number of tokens counted per layer.
"""

from __future__ import annotations

import torch

from .base import ScoreResult, ScoringContext, register_criterion
from .capture import RoutingRecord, RoutingStatisticCriterion, expert_accumulators


@register_criterion
class FrequencyCriterion(RoutingStatisticCriterion):
    """Top-k selection counts per expert over the calibration tokens."""

    name = "frequency"
    reference = "https://arxiv.org/abs/2402.14800"
    pass_label = "frequency"

    def statistic(self, context: ScoringContext):
        counts = expert_accumulators(context)

        def accumulate(record: RoutingRecord) -> None:
            num_experts = counts[record.layer.index].shape[0]
            index = record.top_k_index.reshape(-1).to("cpu")
            index = index[index < num_experts]  # a skipped slot (index == num_experts) is no selection
            counts[record.layer.index] += torch.bincount(index, minlength=num_experts).to(torch.float64)

        def finish(tokens: int) -> ScoreResult:
            scores = {index: c.to(torch.float32) for index, c in counts.items()}
            return ScoreResult(scores=scores, ranking="top-k selection count", details={"tokens": tokens})

        return accumulate, finish
