"""What each MoE layer allows a selection to do, and the wording of a request no selection can meet.

A layer's limits (:func:`layer_limits`) come from its family's routing rules (top-k, family minimum, grouped
routing) plus the user's floor (``min_experts_per_layer``) and cap (``max_layer_sparsity``). ``diep_hub.selection``
picks experts within them; the pruner's feasibility check and the dry run report a sparsity they cannot reach
with :func:`unreachable_sparsity`, whose message names the requested sparsity and the largest feasible one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError
from .families import MoELayer


@dataclass(frozen=True)


class LayerLimits:
    """What one layer allows: its expert count, floor, and the removal counts it accepts."""

    index: int
    num_experts: int
    floor: int
    allowed_removals: tuple[int, ...]
    why: str
    n_group: int = 1  # > 1: grouped routing, which removes the same number of experts from every group

    @property
    def max_removal(self) -> int:
        return max(self.allowed_removals)


def round_half_up(value: float) -> int:
    """Round to the nearest integer, halves up (Python's round() sends 2.5 to 2); 1e-9 absorbs float noise."""
    return int(math.floor(value + 0.5 + 1e-9))


def layer_limits(
    layer: MoELayer,
    config,
    *,
    max_layer_sparsity: float | None = None,
    min_experts_per_layer: int | None = None,
    regroup: bool = False,
) -> LayerLimits:
    """The constraints of one layer, read from the live router (a pruned layer may have its own top-k/groups).

    The routing rules (top-k, family minimum, groups) come from the family adapter; this adds the user's floor and
    cap and lists the removal counts they all allow.
    """
    family, n = layer.family, layer.num_experts
    rules = family.routing_rules(layer, config, regroup=regroup)
    reasons = [f"top-k {rules.top_k}"]
    floor = rules.top_k
    if rules.min_experts > floor:
        floor = rules.min_experts
        reasons.append(f"{family.model_type} minimum {rules.min_experts}")
    if rules.grouped:
        floor = max(floor, rules.group_floor)
        reasons.append(f"grouped routing: a multiple of n_group={rules.n_group}, >= {rules.min_per_group} a group")
    if min_experts_per_layer is not None and min_experts_per_layer > floor:
        floor = min_experts_per_layer
        reasons.append(f"min_experts_per_layer {min_experts_per_layer}")
    floor = min(floor, n)
    max_removal = n - floor
    if max_layer_sparsity is not None:
        cap = int(math.floor(max_layer_sparsity * n + 1e-9))
        if cap < max_removal:
            max_removal = cap
            reasons.append(f"max_layer_sparsity {max_layer_sparsity} (at most {cap} removed)")
    allowed = [0] + [removed for removed in range(1, max_removal + 1) if rules.accepts(n - removed)]
    return LayerLimits(
        index=layer.index,
        num_experts=n,
        floor=floor,
        allowed_removals=tuple(allowed),
        why=", ".join(reasons),
        n_group=rules.n_group,
    )


def reachable(limits: list[LayerLimits]) -> int:
    """Bitset (Python int) of every total removal count the layers allow together."""
    reach = 1
    for lim in limits:
        step = 0
        for removed in lim.allowed_removals:
            step |= reach << removed
        reach = step
    return reach


def infeasible(sparsity: float, target: int, total: int, limits: list[LayerLimits], mode: str, extra: str = ""):
    """The ConfigError for a total removal count no per-layer distribution reaches: nearest and largest feasible."""
    reach = reachable(limits)
    counts = [t for t in range(reach.bit_length()) if reach >> t & 1]
    below = max((t for t in counts if t < target), default=0)
    above = min((t for t in counts if t > target), default=None)
    largest = max(counts)
    nearest = f"nearest feasible counts: {below} ({below / total:.4f})" + (
        f" and {above} ({above / total:.4f})" if above is not None else ""
    )
    per_layer = "; ".join(
        f"layer {lim.index}: removes one of {list(lim.allowed_removals)} ({lim.why})" for lim in limits
    )
    return ConfigError(
        f"sparsity={sparsity} asks to remove {target} of {total} routed experts ({mode} selection), which the "
        f"per-layer constraints do not allow{extra}; the largest feasible sparsity is {largest / total:.4f} "
        f"({largest} experts); {nearest}. Constraints: {per_layer}. Lower the sparsity, relax "
        "max_layer_sparsity / min_experts_per_layer, or pass regroup=True for grouped-routing layers."
    )


def uniform_infeasible(sparsity: float, removals: dict[int, int], limits: list[LayerLimits]) -> ConfigError | None:
    """The ConfigError for uniform removals (layer -> count) that some layer does not allow; None when all do."""
    bad = [lim for lim in limits if removals[lim.index] not in lim.allowed_removals]
    if not bad:
        return None
    lim = bad[0]
    return ConfigError(
        f"sparsity={sparsity} in uniform mode removes {removals[lim.index]} of layer {lim.index}'s "
        f"{lim.num_experts} experts, which it does not allow (it removes one of {list(lim.allowed_removals)}: "
        f"{lim.why}); the largest feasible uniform sparsity is {largest_uniform(limits):.4f}"
    )


def largest_uniform(limits: list[LayerLimits]) -> float:
    """Largest sparsity s whose uniform removals round_half_up(s * N_l) every layer accepts."""
    candidates = sorted({m / lim.num_experts for lim in limits for m in lim.allowed_removals}, reverse=True)
    for s in candidates:
        if all(round_half_up(s * lim.num_experts) in lim.allowed_removals for lim in limits):
            return s
    return 0.0


def unreachable_sparsity(sparsity, family, layers, exc: Exception) -> ConfigError:
    """The one wording of "this sparsity cannot be reached here", for the pruner and the dry run."""
    total = sum(layer.num_experts for layer in layers)
    return ConfigError(
        f"sparsity={sparsity} cannot be reached on this {family.model_type} model "
        f"({len(layers)} MoE layers, {total} routed experts): {exc}"
    )


__all__ = [
    "LayerLimits",
    "infeasible",
    "largest_uniform",
    "layer_limits",
    "reachable",
    "round_half_up",
    "uniform_infeasible",
    "unreachable_sparsity",
]
