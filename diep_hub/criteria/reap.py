"""REAP (Router-weighted Expert Activation Pruning, Lasby et al.): how much each expert adds to the output when
the router chooses it.

Formula: s_j^(l) = (1 / |X_j|) * sum_{x in X_j} g_j(x) * || E_j(x) ||_2, where X_j is the set of calibration
tokens whose top-k includes expert j, g_j(x) the gate weight the block multiplies E_j(x) by (after the family's
renormalisation and scaling), and E_j(x) expert j's output on x. An expert never chosen scores 0.
Reference: Lasby et al., "REAP the Experts: Why Pruning Prevails for One-Shot MoE compression",
https://arxiv.org/abs/2510.13999.

E_j(x) is computed by the layer's own fused experts module on the tokens routed to j (one extra call per
layer and batch, as many expert evaluations as the forward pass itself), so every family and experts backend
is handled the same way.
"""

from __future__ import annotations

import torch

from .base import ScoreResult, ScoringContext, register_criterion
from .capture import RoutingRecord, RoutingStatisticCriterion, expert_accumulators


def routed_expert_outputs(record: RoutingRecord) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each chosen (token, expert) pair's expert output, unweighted.

    Returns:
        (expert ids [P], gate weights [P], outputs [P, H]) for the P routed pairs of the batch.
    """
    num_experts = record.layer.num_experts
    tokens, k = record.top_k_index.shape
    index = record.top_k_index.reshape(-1)
    weights = record.top_k_weights.reshape(-1)
    routed = index < num_experts  # a skipped slot (index == num_experts) contributes nothing
    token_of_pair = torch.arange(tokens, device=index.device).repeat_interleave(k)[routed]
    index, weights = index[routed], weights[routed]
    hidden = record.hidden.index_select(0, token_of_pair.to(record.hidden.device))
    ones = torch.ones(index.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
    outputs = record.layer.experts(hidden, index.reshape(-1, 1).to(hidden.device), ones)
    return index, weights, outputs


@register_criterion
class REAPCriterion(RoutingStatisticCriterion):
    """Mean router-weighted expert output norm over the tokens routed to each expert."""

    name = "reap"
    reference = "https://arxiv.org/abs/2510.13999"
    pass_label = "REAP"

    def statistic(self, context: ScoringContext):
        sums, counts = expert_accumulators(context), expert_accumulators(context)

        def accumulate(record: RoutingRecord) -> None:
            index, weights, outputs = routed_expert_outputs(record)
            norms = torch.linalg.vector_norm(outputs.float(), dim=-1)
            contribution = (weights.to(norms.device).float() * norms).to("cpu", torch.float64)
            index = index.to("cpu")
            sums[record.layer.index].index_add_(0, index, contribution)
            counts[record.layer.index].index_add_(0, index, torch.ones_like(contribution))

        def finish(tokens: int) -> ScoreResult:
            scores = {
                index: torch.where(counts[index] > 0, sums[index] / counts[index].clamp_min(1), 0.0).to(torch.float32)
                for index in sums
            }
            details = {"tokens": tokens,
                       "routed_tokens": {str(i): c.to(torch.int64).tolist() for i, c in counts.items()}}
            return ScoreResult(
                scores=scores, ranking="mean gate_weight * ||expert output||_2 over routed tokens", details=details
            )

        return accumulate, finish
