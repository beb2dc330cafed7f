# Copyright 2026 the diep_hub authors. Apache-2.0.
"""Adaptive expert skipping inside a DiEP-pruned checkpoint (travels with it as remote code, beside
modeling_diep.py; imports only torch).

Adaptive expert skipping (DiEP section 3.3), applied when ``config.diep_skipping["enabled"]`` is true: a forward
pre-hook on each MoE layer's experts (``DiepExpertSkipping``) sees the routing (indices, weights) the family
computed, takes the highest-weight expert e0 as primary, and skips every other selected expert e with
``w_e < gamma1 * cka_ratio[e0][e] * w_e0``; skipped weights become 0 and the kept weights are rescaled to keep
their original sum (top-2: the primary gets w_e0 + w_e1). For top-k > 2 each non-primary expert is tested
against the primary. Turn it off at load time with ``from_pretrained(..., diep_skipping_enabled=False)`` or on a
live model with ``model.config.diep_skipping["enabled"] = False; model.diep_configure_skipping()``.

How a skipped expert saves compute, on every family and every experts backend (grouped_mm, eager, batched_mm,
GPT-OSS included, so no family falls back to zero weights): the pre-hook hands the experts only the routing slots
that remain, as a top-1 call over [kept slots, H]; a forward hook puts the rows back in [T, k] and sums over k.
We tried the sentinel route first (index ``num_experts`` with ``experts._is_expert_parallel = True`` in
grouped_mm): it is correct, but grouped_mm's expert-parallel masking copies the [slots, 2 x intermediate]
activations, which on CPU cost more than the skipped GEMMs saved; and GPT-OSS's eager loop has no sentinel class.
Cost of the compaction: one host sync per MoE layer (to size the kept rows), as the eager backend already has.
"""

import torch


class DiepExpertSkipping:
    """The skip rule of one MoE layer, run by two hooks on that layer's experts module.

    ``before`` (forward pre-hook) decides which routing slots to skip and hands the experts only the slots that
    remain, one per row (top-1 calls on [kept slots, H]), so skipped experts cost nothing on any backend;
    ``after`` (forward hook) scatters the rows back to [T, k] and sums over k as the backends do. A batch with
    nothing skipped passes through untouched (bit-identical to no skipping).

    ``gamma[e0][e] = gamma1 * cka_ratio[e0][e]`` is built once per device from the config's lists (so a live model
    and one reloaded from disk use the very same float32 values). Counters: ``skipped`` non-primary routing slots
    out of ``slots`` seen since ``reset()``. Setting ``record`` to a list appends each call's skip mask [T, k].
    """

    def __init__(self, layer_idx: int, gamma1: float, cka_ratio):
        self.layer_idx = layer_idx
        self.gamma1 = float(gamma1)
        self.cka_ratio = [[float(v) for v in row] for row in cka_ratio]
        self.active = True
        self.record = None
        self._gamma = {}
        self._pending = None
        self.reset()

    def reset(self):
        self.skipped = 0
        self.slots = 0

    def gamma(self, device) -> torch.Tensor:
        if device not in self._gamma:
            table = torch.tensor(self.cka_ratio, dtype=torch.float32) * self.gamma1
            self._gamma[device] = table.to(device)
        return self._gamma[device]

    def decide(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Boolean [T, k]: True where a non-primary slot is skipped. Ties: the first slot of the max is primary."""
        weights = top_k_weights.detach().float()
        primary = weights.argmax(dim=-1, keepdim=True)
        w0 = weights.gather(-1, primary)
        e0 = top_k_index.gather(-1, primary)
        skip = weights < self.gamma(top_k_index.device)[e0, top_k_index] * w0
        return skip.scatter(-1, primary, False)

    def reweight(self, top_k_weights: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Zero the skipped weights and rescale the kept ones to the original sum (top-2: primary = w0 + w1)."""
        kept = top_k_weights.masked_fill(skip, 0)
        total = top_k_weights.sum(dim=-1, keepdim=True)
        rescaled = kept * (total / kept.sum(dim=-1, keepdim=True))
        # a row left with its primary only (always, for top-2) gives the primary the original sum exactly
        alone = (skip.sum(dim=-1, keepdim=True) == skip.shape[-1] - 1) & ~skip
        rescaled = torch.where(alone, total.expand_as(kept), rescaled)
        return torch.where(skip.any(dim=-1, keepdim=True), rescaled, top_k_weights)

    def before(self, experts, args):
        self._pending = None
        if not self.active or len(args) != 3 or args[1].dim() != 2 or args[1].shape[-1] < 2:
            return None
        if len(self.cka_ratio) != experts.num_experts:
            raise ValueError(
                f"layer {self.layer_idx}: the skipping table covers {len(self.cka_ratio)} experts but the layer has "
                f"{experts.num_experts}; recalibrate skipping after pruning"
            )
        hidden_states, top_k_index, top_k_weights = args
        with torch.no_grad():
            skip = self.decide(top_k_index, top_k_weights)
        num_tokens, k = skip.shape
        self.skipped = self.skipped + skip.sum()
        self.slots += num_tokens * (k - 1)
        if self.record is not None:
            self.record.append(skip.cpu())
        if not bool(skip.any()):
            return None
        rows = (~skip).reshape(-1).nonzero().squeeze(-1)  # kept slots, token-major
        weights = self.reweight(top_k_weights, skip).reshape(-1)[rows]
        self._pending = (rows, num_tokens, k)
        return hidden_states[rows // k], top_k_index.reshape(-1)[rows].unsqueeze(-1), weights.unsqueeze(-1)

    def after(self, experts, args, output):
        if self._pending is None:
            return None
        rows, num_tokens, k = self._pending
        self._pending = None
        slots = output.new_zeros(num_tokens * k, output.shape[-1]).index_copy_(0, rows, output)
        return slots.view(num_tokens, k, -1).sum(dim=1)
