"""From scores to a keep map: which experts each MoE layer keeps for a requested sparsity.

Two modes:

- ``"global"`` (DiEP's way, non-uniform): all (layer, expert) scores are ranked together and exactly
  K = round_half_up(sparsity * total routed experts) experts are removed, the lowest-scoring ones that the
  per-layer constraints allow. Scores must be comparable across layers (DiEP's softmax(alpha) * beta is).
  Formally: choose per-layer removal counts m_l from each layer's allowed set with sum m_l = K, removing in each
  layer its m_l lowest scores, minimising the sum of removed scores (ties: the removal set made of the lowest
  global ranks, ranks ordered by score, then layer, then expert id). Without group constraints this is exactly
  "sort everything and drop the K lowest, skipping experts whose layer has reached its limit"; with DeepSeek-V3
  group constraints (allowed kept counts jump by n_group) it is solved exactly by dynamic programming.
- ``"uniform"``: every layer removes round_half_up(sparsity * N_l) of its N_l experts (the same count in every
  layer when layers have equal expert counts, as in every stock model), its lowest-scoring ones.

Per-layer constraints (checked here so that surgery never refuses a selection):
    kept >= floor = max(top-k, family minimum, n_group * experts-per-group for grouped routing,
                        min_experts_per_layer);
    removed <= floor(max_layer_sparsity * N_l) when a cap is given;
    DeepSeek-V3 grouped routing: every group keeps the same number of experts, >= 2 (unless ``regroup``), so the
    kept count is a multiple of n_group and each group gives up its own least important experts;
    keeping everything is always allowed.
When no distribution satisfies them with exactly K removed, a ConfigError names the requested sparsity and the
largest feasible one.

Per-layer limits, rounding and the feasibility messages are in ``diep_hub.selection_limits`` (importable from here).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .families import MoELayer, get_family
from .selection_limits import (
    LayerLimits,
    infeasible,
    layer_limits,
    reachable,
    round_half_up,
    uniform_infeasible,
    unreachable_sparsity,
)

logger = logging.getLogger(__name__)

MODES = ("global", "uniform")


@dataclass


class Selection:
    """A keep map and how it was reached; plain data for reports, cards and ``prune_experts``.

    Attributes:
        keep: layer index -> sorted ids of the experts it keeps.
        num_removed: experts removed in total.
        num_total: routed experts in total before selection.
        per_layer_kept: layer index -> number of experts kept.
        rounding: how the removal count was rounded and distributed, in words.
        mode: "global" or "uniform".
        sparsity: the requested sparsity.
        regroup: whether grouped-routing layers must be regrouped (pass to ``prune_experts(regroup=...)``).
        floors: layer index -> fewest experts the layer may keep.
    """

    keep: dict[int, list[int]]
    num_removed: int
    num_total: int
    per_layer_kept: dict[int, int]
    rounding: str
    mode: str
    sparsity: float = 0.0
    regroup: bool = False
    floors: dict[int, int] = field(default_factory=dict)

    @property
    def achieved_sparsity(self) -> float:
        return self.num_removed / self.num_total if self.num_total else 0.0

    def to_dict(self) -> dict:
        """JSON-able form (layer keys as strings, as JSON requires)."""
        data = asdict(self)
        for key in ("keep", "per_layer_kept", "floors"):
            data[key] = {str(i): v for i, v in data[key].items()}
        data["achieved_sparsity"] = self.achieved_sparsity
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> Selection:
        data = dict(data)
        data.pop("achieved_sparsity", None)
        for key in ("keep", "per_layer_kept", "floors"):
            data[key] = {int(i): v for i, v in data.get(key, {}).items()}
        data["keep"] = {i: [int(e) for e in ids] for i, ids in data["keep"].items()}
        return cls(**data)


def _check_number(name: str, value, low: float, high: float, high_inclusive: bool) -> float:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if not bad:
        bad = value < low or (value > high if high_inclusive else value >= high)
    if bad:
        bracket = "]" if high_inclusive else ")"
        raise ConfigError(f"{name}={value!r} must be a number in [{low:g}, {high:g}{bracket}")
    return float(value)


def _check_scores(scores, layers: list[MoELayer]) -> dict[int, np.ndarray]:
    if not isinstance(scores, Mapping):
        raise ConfigError(
            f"scores must be a mapping {{layer index: tensor [num_experts]}}, got {type(scores).__name__}"
        )
    by_index = {layer.index: layer for layer in layers}
    keys = {int(k) for k in scores}
    missing, extra = sorted(set(by_index) - keys), sorted(keys - set(by_index))
    if missing or extra:
        raise ConfigError(
            f"scores must have one entry per MoE layer {sorted(by_index)}; missing {missing}, not MoE layers {extra}"
        )
    checked = {}
    for key, value in scores.items():
        index = int(key)
        array = torch.as_tensor(value).detach().to("cpu", torch.float64).numpy()
        expected = by_index[index].num_experts
        if array.shape != (expected,):
            raise ConfigError(f"scores[{index}] has shape {array.shape}, expected ({expected},): one score per expert")
        if not np.isfinite(array).all():
            bad = np.nonzero(~np.isfinite(array))[0].tolist()
            raise ConfigError(f"scores[{index}] has non-finite values at experts {bad}")
        checked[index] = array
    return checked


def _global_removals(arrays: dict[int, np.ndarray], limits: list[LayerLimits], target: int) -> dict[int, int]:
    """Exact-K removal counts per layer minimising the removed score, ties by global rank sum.

    When every layer accepts any removal count from 0 to its maximum (no grouped routing), the greedy walk up the
    global ranking is optimal and gives the DP's answer (tests/test_selection.py checks them against each other);
    it is the one a refinement's thousands of rebuildability checks can afford. Otherwise the DP solves it.
    """
    if all(lim.allowed_removals == tuple(range(lim.max_removal + 1)) for lim in limits):
        return _greedy_removals(arrays, limits, target)
    return _dp_removals(arrays, limits, target)


def _global_ranking(arrays: dict[int, np.ndarray], limits: list[LayerLimits]) -> list[tuple[float, int, int]]:
    """Every (score, layer, expert), lowest first: by score, then layer, then expert id (the global ranks)."""
    return sorted((float(arrays[lim.index][e]), lim.index, e) for lim in limits for e in range(lim.num_experts))


def _greedy_removals(arrays: dict[int, np.ndarray], limits: list[LayerLimits], target: int) -> dict[int, int]:
    """Remove the ``target`` lowest-ranked experts, skipping those of a layer at its maximum removal: with
    contiguous allowed counts the removable sets form a matroid, so this minimises both the removed score and the
    rank sum. ``target`` must be reachable (``select_experts`` checks it first)."""
    room = {lim.index: lim.max_removal for lim in limits}
    removals = dict.fromkeys(room, 0)
    left = target
    for _, layer, _ in _global_ranking(arrays, limits):
        if left == 0:
            break
        if removals[layer] < room[layer]:
            removals[layer] += 1
            left -= 1
    if left:
        raise AssertionError(f"{target} removals are not reachable under {room}: select_experts checks this first")
    return removals


def _dp_removals(arrays: dict[int, np.ndarray], limits: list[LayerLimits], target: int) -> dict[int, int]:
    """Exact-K removal counts per layer minimising the removed score (DP over layers; ties by global rank sum)."""
    entries = _global_ranking(arrays, limits)
    rank = {(layer, expert): r for r, (_, layer, expert) in enumerate(entries)}
    scale = 1.0 + sum(abs(v) for v, _, _ in entries)
    tol = 1e-12 * scale
    inf = float("inf")
    cost = np.full(target + 1, inf)
    ranks = np.full(target + 1, np.iinfo(np.int64).max, dtype=np.int64)
    cost[0], ranks[0] = 0.0, 0
    choices = []
    for lim in limits:
        order = _removal_order(arrays[lim.index], lim.n_group)
        prefix = np.concatenate([[0.0], np.cumsum(arrays[lim.index][order])])
        rank_prefix = np.concatenate([[0], np.cumsum([rank[(lim.index, int(e))] for e in order])]).astype(np.int64)
        new_cost = np.full(target + 1, inf)
        new_ranks = np.full(target + 1, np.iinfo(np.int64).max, dtype=np.int64)
        choice = np.full(target + 1, -1, dtype=np.int64)
        for removed in lim.allowed_removals:
            if removed > target:
                continue
            cand_cost = np.full(target + 1, inf)
            cand_ranks = np.full(target + 1, np.iinfo(np.int64).max, dtype=np.int64)
            cand_cost[removed:] = cost[: target + 1 - removed] + prefix[removed]
            valid = np.isfinite(cand_cost)
            cand_ranks[valid] = ranks[: target + 1 - removed][valid[removed:]] + rank_prefix[removed]
            open_slot = ~np.isfinite(new_cost)
            with np.errstate(invalid="ignore"):
                gap = np.where(open_slot | ~valid, 0.0, cand_cost - new_cost)
            better = valid & (open_slot | (gap < -tol) | ((np.abs(gap) <= tol) & (cand_ranks < new_ranks)))
            new_cost[better], new_ranks[better], choice[better] = cand_cost[better], cand_ranks[better], removed
        cost, ranks = new_cost, new_ranks
        choices.append(choice)
    removals, remaining = {}, target
    for lim, choice in zip(reversed(limits), reversed(choices)):
        removed = int(choice[remaining])
        removals[lim.index] = removed
        remaining -= removed
    return removals


def _layer_order(array: np.ndarray) -> np.ndarray:
    """Expert ids from least to most important: by score, ties by expert id (stable sort)."""
    return np.argsort(array, kind="stable")


def _removal_order(array: np.ndarray, n_group: int = 1) -> np.ndarray:
    """The order in which a layer gives up experts; its first m entries are the m experts removed.

    With grouped routing (n_group > 1, contiguous groups of N / n_group experts) experts must leave every group
    at the same pace, or surgery would re-cut the kept experts into groups they did not belong to and change the
    routing: round j removes the j-th least important expert of each group, so removing m * n_group experts
    removes the m least important of every group. Allowed removal counts are multiples of n_group.
    """
    if n_group <= 1:
        return _layer_order(array)
    size = len(array) // n_group
    per_group = [g * size + _layer_order(array[g * size : (g + 1) * size]) for g in range(n_group)]
    return np.stack(per_group, axis=1).reshape(-1)


def select_experts(
    scores: Mapping[int, torch.Tensor],
    model: nn.Module,
    *,
    sparsity: float,
    mode: str = "global",
    max_layer_sparsity: float | None = None,
    min_experts_per_layer: int | None = None,
    regroup: bool = False,
) -> Selection:
    """Turn per-(layer, expert) scores (higher = more important) into a keep map for ``prune_experts``.

    Args:
        scores: ``{MoE layer index: tensor [num_experts]}`` for every MoE layer of ``model``.
        model: the model the scores belong to (stock or already pruned); gives expert counts, top-k, groups.
        sparsity: fraction of routed experts to remove, in [0, 1).
        mode: "global" (rank across layers, exact total) or "uniform" (same count a layer).
        max_layer_sparsity: optional cap on the fraction any one layer loses, in [0, 1].
        min_experts_per_layer: optional extra floor on the experts a layer keeps (>= 1).
        regroup: drop DeepSeek-V3's group constraint; layers are then routed without groups after surgery.

    Raises:
        ConfigError: a bad argument, scores that do not match the model, or a sparsity the constraints cannot
            reach exactly (the message gives the largest feasible sparsity).
    """
    sparsity = _check_number("sparsity", sparsity, 0.0, 1.0, high_inclusive=False)
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not a selection mode; choose one of {list(MODES)}")
    if max_layer_sparsity is not None:
        max_layer_sparsity = _check_number("max_layer_sparsity", max_layer_sparsity, 0.0, 1.0, high_inclusive=True)
    if min_experts_per_layer is not None and (
        isinstance(min_experts_per_layer, bool)
        or not isinstance(min_experts_per_layer, int)
        or min_experts_per_layer < 1
    ):
        raise ConfigError(f"min_experts_per_layer={min_experts_per_layer!r} must be an integer >= 1")
    if not isinstance(regroup, bool):
        raise ConfigError(f"regroup={regroup!r} must be True or False")
    family = get_family(model)
    layers = family.moe_layers(model)
    arrays = _check_scores(scores, layers)
    limits = [
        layer_limits(
            layer,
            model.config,
            max_layer_sparsity=max_layer_sparsity,
            min_experts_per_layer=min_experts_per_layer,
            regroup=regroup,
        )
        for layer in layers
    ]
    total = sum(lim.num_experts for lim in limits)

    if mode == "global":
        exact = sparsity * total
        target = round_half_up(exact)
        if not reachable(limits) >> target & 1:
            raise infeasible(sparsity, target, total, limits, mode)
        removals = _global_removals(arrays, limits, target)
        rounding = (
            f"K = round_half_up({sparsity} x {total} routed experts = {exact:.4f}) = {target} removed in total, "
            "distributed by ranking all (layer, expert) scores together (lowest removed first, ties by layer then "
            "expert id) under the per-layer floors/caps/group rules"
        )
    else:
        removals = {lim.index: round_half_up(sparsity * lim.num_experts) for lim in limits}
        error = uniform_infeasible(sparsity, removals, limits)
        if error is not None:
            raise error
        target = sum(removals.values())
        counts = sorted(set(removals.values()))
        per_layer = counts if len(counts) > 1 else counts[0]
        rounding = (
            f"uniform: each layer removes round_half_up({sparsity} x N_l) experts ({per_layer} "
            f"a layer), {target} of {total} in total (global rounding would remove {round_half_up(sparsity * total)})"
        )

    keep = {}
    for lim in limits:
        order = _removal_order(arrays[lim.index], lim.n_group)
        removed = set(order[: removals[lim.index]].tolist())
        keep[lim.index] = [e for e in range(lim.num_experts) if e not in removed]
    selection = Selection(
        keep=keep,
        num_removed=target,
        num_total=total,
        per_layer_kept={i: len(ids) for i, ids in keep.items()},
        rounding=rounding,
        mode=mode,
        sparsity=sparsity,
        regroup=regroup,
        floors={lim.index: lim.floor for lim in limits},
    )
    logger.info(
        "selection (%s): removing %d of %d experts; kept per layer %s", mode, target, total, selection.per_layer_kept
    )
    return selection


def uniform_keep_counts(
    model: nn.Module,
    *,
    sparsity: float,
    max_layer_sparsity: float | None = None,
    min_experts_per_layer: int | None = None,
    regroup: bool = False,
) -> dict[int, int]:
    """Experts each MoE layer keeps under uniform selection, known before any scoring.

    Criteria that search subsets of a given size (NAEE, ``needs_target_counts``) need these counts up front;
    the same validation and errors as ``select_experts(..., mode="uniform")`` apply.
    """
    layers = get_family(model).moe_layers(model)
    placeholder = {layer.index: torch.zeros(layer.num_experts) for layer in layers}
    selection = select_experts(
        placeholder,
        model,
        sparsity=sparsity,
        mode="uniform",
        max_layer_sparsity=max_layer_sparsity,
        min_experts_per_layer=min_experts_per_layer,
        regroup=regroup,
    )
    return selection.per_layer_kept


__all__ = [
    "MODES",
    "LayerLimits",
    "Selection",
    "layer_limits",
    "round_half_up",
    "select_experts",
    "uniform_keep_counts",
    "unreachable_sparsity",
]
