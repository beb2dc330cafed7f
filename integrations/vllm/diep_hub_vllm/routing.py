# Copyright 2026 the diep_hub authors. Apache-2.0.
"""DiEP adaptive expert skipping as a vLLM custom routing function.

Same rule as the checkpoint's remote code (skipping_diep.py): the family's top-k routing is computed first (softmax
over the router logits, top-k, renormalised where the family renormalises); then, with e0 the token's
highest-weighted expert, every other selected expert e is skipped when ``w_e < gamma1 * cka_ratio[e0][e] * w_e0``;
skipped weights become 0 and the kept ones are rescaled to their original sum (top-2: the primary gets
w_e0 + w_e1). A skipped slot keeps its expert id with weight 0, so vLLM's fused kernels add nothing for it.
"""

from __future__ import annotations

import torch

from .plan import LayerSkipping


def softmax_top_k(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax top-k every supported family routes with (float32 weights, int64 ids)."""
    logits = logits.float()
    top_logits, ids = torch.topk(logits, k=top_k, dim=-1)
    if renormalize:
        weights = torch.softmax(top_logits, dim=-1)
    else:
        weights = (top_logits - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
    return weights, ids


def skip_mask(ids: torch.Tensor, weights: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Boolean [T, k]: True where a non-primary slot is skipped (ties: the first slot of the max is primary)."""
    primary = weights.argmax(dim=-1, keepdim=True)
    w0 = weights.gather(-1, primary)
    e0 = ids.gather(-1, primary)
    skip = weights < gamma[e0, ids] * w0
    return skip.scatter(-1, primary, False)


def reweight(weights: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Zero the skipped weights, rescale the kept ones to the original sum (a lone primary gets the sum exactly)."""
    kept = weights.masked_fill(skip, 0)
    total = weights.sum(dim=-1, keepdim=True)
    rescaled = kept * (total / kept.sum(dim=-1, keepdim=True))
    alone = (skip.sum(dim=-1, keepdim=True) == skip.shape[-1] - 1) & ~skip
    rescaled = torch.where(alone, total.expand_as(kept), rescaled)
    return torch.where(skip.any(dim=-1, keepdim=True), rescaled, weights)


class SkippingRouter:
    """``custom_routing_function`` of one MoE layer: the family's top-k routing, then the DiEP skip rule."""

    def __init__(self, layer_index: int, skipping: LayerSkipping):
        self.layer_index = layer_index
        # gamma[e0][e] = gamma1 * cka_ratio[e0][e], built in float32 like the remote code, so both decide alike
        self.gamma = torch.tensor(skipping.cka_ratio, dtype=torch.float32) * float(skipping.gamma1)

    def __call__(self, hidden_states, gating_output, topk, renormalize):
        weights, ids = softmax_top_k(gating_output, topk, renormalize)
        if topk < 2:
            return weights, ids.to(torch.int32)
        if self.gamma.device != gating_output.device:
            self.gamma = self.gamma.to(gating_output.device)
        skip = skip_mask(ids, weights, self.gamma)
        return reweight(weights, skip), ids.to(torch.int32)
