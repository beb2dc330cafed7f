"""Refinement of a keep map: greedy small moves, each measured by the masked KL, that the run's selection can
rebuild.

``validated_choice`` (criteria/choice.py) refines the keep maps it judged with :func:`refine_keep_map`. A move is
kept only if it lowers the masked KL (criteria/masked_kl.py) on the refine sequences; whether a move is allowed is
always asked of the run's own selection (:func:`keep_map_scores` encodes a keep map as scores it rebuilds), never
re-derived here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS

from ..selection_limits import layer_limits
from .masked_kl import MaskedKL

#: progress-bar and MaskedKL label of a refinement (validated_choice's)
REFINING = "validated_choice: refining"


def keep_map_scores(keep: dict[int, list[int]], scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Scores under which a selection rebuilds ``keep``: 1 + r for a kept expert, r for a removed one, where r in
    [0, 0.5) is the expert's rank within its layer under ``scores`` (so ties and group order still follow them)."""
    encoded = {}
    for index, layer_scores in scores.items():
        order = torch.argsort(layer_scores.detach().to(torch.float64).cpu(), stable=True)
        rank = torch.empty(len(order), dtype=torch.float64)
        rank[order] = torch.arange(len(order), dtype=torch.float64)
        kept = torch.zeros(len(order), dtype=torch.float64)
        kept[list(keep[index])] = 1.0
        encoded[index] = kept + 0.5 * rank / len(order)
    return encoded


def _moved(keep: dict[int, list[int]], drop: tuple[int, tuple[int, ...]] | None = None,
           add: tuple[int, tuple[int, ...]] | None = None) -> dict[int, list[int]]:
    """A copy of ``keep`` with experts ``drop[1]`` gone from layer ``drop[0]`` and ``add[1]`` joined to ``add[0]``."""
    moved = {index: list(ids) for index, ids in keep.items()}
    if drop is not None:
        for expert in drop[1]:
            moved[drop[0]].remove(expert)
    if add is not None:
        moved[add[0]] = sorted(moved[add[0]] + list(add[1]))
    return moved


def rebuilds_keep_map(select, scores: dict[int, torch.Tensor], keep: dict[int, list[int]]) -> bool:
    """Whether the run's selection of ``scores`` keeps exactly ``keep``."""
    rebuilt = select(scores).keep
    return all(sorted(rebuilt[index]) == sorted(ids) for index, ids in keep.items())


@dataclasses.dataclass
class _Move:
    """Experts ``drop[1]`` leave layer ``drop[0]``'s keep map, ``add[1]`` join layer ``add[0]``'s: one expert each
    way, or under grouped routing one expert of every group each way (a layer's kept count then moves in steps of
    its number of groups)."""

    drop: tuple[int, tuple[int, ...]]
    add: tuple[int, tuple[int, ...]]
    estimate: float

    def apply(self, keep: dict[int, list[int]]) -> dict[int, list[int]]:
        return _moved(keep, self.drop, self.add)

    def to_dict(self) -> dict:
        return {"drop": [self.drop[0], list(self.drop[1])], "add": [self.add[0], list(self.add[1])]}


#: why a refinement stopped (``RefinedKeepMap.stopped``)
NO_BETTER_MOVE = "no move lowers the KL"
BELOW_GAIN_FLOOR = "best move's gain below min_move_gain_se"
ROUNDS_DONE = "rounds done"
BUDGET_SPENT = "budget of passes spent"


class RefinedKeepMap(NamedTuple):
    """What :func:`refine_keep_map` returns."""

    keep: dict[int, list[int]]
    #: the moves taken, in order (``_Move.to_dict``)
    moves: list[dict]
    #: the KL after each round, starting with the unrefined map's (empty when the budget held no measurement)
    history: list[float]
    #: why the search stopped: one of NO_BETTER_MOVE, BELOW_GAIN_FLOOR, ROUNDS_DONE, BUDGET_SPENT
    stopped: str
    #: the probe width each round measured (below ``probe_width`` where the budget of passes narrowed it)
    probe_widths: list[int]
    #: passes over the sequences it spent, in ``max_passes``' units
    passes: float


def gain_in_standard_errors(before: torch.Tensor, after: torch.Tensor) -> float:
    """How many standard errors the per-sequence KL ``after`` lies below ``before`` (the paired difference's mean
    over its standard error; inf when every sequence gains alike, 0 when none does)."""
    gain = before - after
    if gain.numel() < 2:
        return 0.0
    error = float(gain.std(unbiased=True)) / math.sqrt(gain.numel())
    mean = float(gain.mean())
    if error == 0.0:
        return math.inf if mean > 0 else 0.0
    return mean / error


def _routing_groups(model, layers) -> dict[int, int]:
    """Layer index -> its number of routing groups (1 without grouped routing), as the selection reads it."""
    return {layer.index: layer_limits(layer, model.config).n_group for layer in layers}


def refine_keep_map(model, layers, keep: dict[int, list[int]], scores: dict[int, torch.Tensor], select,
                    sequences: torch.Tensor, rounds: int, batch_size: int, candidates_per_round: int = 3,
                    progress: bool = False, kl: MaskedKL | None = None, probe_width: int = 1,
                    min_move_gain_se: float = 0.0, max_passes: float | None = None) -> RefinedKeepMap:
    """Greedy small moves on ``keep`` that lower the masked KL on ``sequences``; returns the refined keep map, the
    moves taken, the KL after each round (starting with the unrefined map's) and why it stopped.

    A round measures, for every layer, the KL with its weakest kept expert removed and with its strongest removed
    expert restored (by ``scores``; with grouped routing, the strongest of the weakest's group, so that the swap of
    the two keeps every group's pace): 2 x layers masked forwards in the first round; later rounds re-measure only
    the layers the last move touched (and any whose weakest or strongest expert changed), reusing the other
    layers' changes, which a move elsewhere shifts only slightly. Those single-expert changes estimate every move
    (a swap within a layer, a slot from one layer to another) as the sum of a removal's cost and a restoration's
    gain. A layer with grouped routing can only change its kept count by one expert of every group at once, so for
    those layers the round also measures the removal of each group's weakest kept expert together and the
    restoration of each group's strongest removed one, which estimate moving such a unit from one layer to
    another. The ``candidates_per_round`` best estimates that the run's own ``select`` can rebuild (floors, caps,
    group rules and uniform counts are its, never re-derived here) are measured exactly; the best is taken if it
    lowers the KL, else the search stops. Moves are only those one expert (or unit) away, so a search of a few
    rounds stays near the validated map.

    ``probe_width`` widens the single-expert probes: each layer's ``probe_width`` weakest kept experts and as many
    strongest removed ones (0: every expert), so that moves the scores' order hides are estimated too; the unit
    probes of grouped layers stay one a layer. Width 1 is the search described above.

    ``min_move_gain_se`` > 0 takes a move only if it lowers the KL by more than that many standard errors of the
    per-sequence difference on ``sequences``: where experts are alike (random weights) every move's gain is
    noise-sized, and a search that takes any lower KL keeps wandering. 0 takes any lower KL.

    ``max_passes`` bounds the cost, in passes of the model over ``sequences`` counted as a forward that resumes at
    each keep map's first change computes them (:meth:`MaskedKL.nominal_shares`: what the cache budget adds is left
    out, so the moves do not depend on it); the start's measurement counts one pass (below one, nothing is
    measured and the history is empty). A round starts only if its
    probes and its shortlist (each shortlisted map counted as a full pass, an upper bound) fit in what is left.
    Where a round at ``probe_width`` would not fit, it measures fewer probes a layer (the weakest and strongest
    first), the widest that fits; where not even one a layer fits, the search stops with what it has. None: no
    bound.

    ``kl``: a :class:`MaskedKL` over ``sequences`` to measure with (refinements sharing one share its cache of the
    unpruned log-probabilities); one without a cache is made when None. The current keep map is its base, so a
    probe computes only the decoder layers from its change onwards.
    """
    def rebuildable(candidate: dict[int, list[int]]) -> bool:
        return rebuilds_keep_map(select, keep_map_scores(candidate, scores), candidate)

    def swap_partner(index: int, drop: int | None, removed: list[int]) -> int:
        """The strongest removed expert that can replace ``drop`` in its layer under the selection's rules (with
        grouped routing: one of its own group), else the strongest removed one."""
        if drop is not None:
            for candidate in removed:
                if rebuildable(_Move((index, (drop,)), (index, (candidate,)), 0.0).apply(current)):
                    return candidate
        return removed[0]

    if kl is None:
        kl = MaskedKL(model, layers, sequences, batch_size, desc=REFINING)
    groups = _routing_groups(model, layers)
    current = {index: sorted(ids) for index, ids in keep.items()}
    if max_passes is not None and max_passes < 1:  # not even the start's measurement fits: nothing is measured
        return RefinedKeepMap(current, [], [], BUDGET_SPENT, [], 0.0)
    base_mean, base_per_sequence = kl.set_base(current)
    history = [base_mean]
    moves_taken = []
    # (kind, layer, experts) -> KL change, kept for untouched layers
    cost: dict[tuple[str, int, tuple[int, ...]], float] = {}
    stopped, widths, passes = ROUNDS_DONE, [], 1.0  # passes: the start's measurement, then each probe's share
    for round_number in tqdm(range(rounds), desc=REFINING, disable=not progress):
        if round_number:  # the last move's map: the probes below resume from its layer outputs
            base_per_sequence = kl.set_base(current)[1]
        weakest, strongest = {}, {}  # layer -> the experts probed singly: [(one expert,), ...]
        unit_drop, unit_add = {}, {}  # grouped layers: layer -> one expert of every group
        for layer in layers:
            layer_scores = scores[layer.index].detach().to(torch.float64).cpu()

            def strength(e: int, layer_scores: torch.Tensor = layer_scores) -> tuple[float, int]:
                return float(layer_scores[e]), e

            kept = current[layer.index]
            removed = sorted((e for e in range(layer.num_experts) if e not in kept),
                             key=lambda e: (-float(layer_scores[e]), e))
            width = probe_width or layer.num_experts
            if len(kept) > 1:
                weakest[layer.index] = [(e,) for e in sorted(kept, key=strength)[:width]]
            if removed:
                partner = swap_partner(layer.index, weakest[layer.index][0][0] if layer.index in weakest else None,
                                       removed)
                strongest[layer.index] = [(e,) for e in [partner, *(e for e in removed if e != partner)][:width]]
            n_group = groups[layer.index]
            if n_group > 1:
                size = layer.num_experts // n_group
                kept_by_group = [[e for e in kept if e // size == g] for g in range(n_group)]
                removed_by_group = [[e for e in removed if e // size == g] for g in range(n_group)]
                if all(len(ids) > 1 for ids in kept_by_group):
                    unit_drop[layer.index] = tuple(min(ids, key=strength) for ids in kept_by_group)
                if all(removed_by_group):
                    unit_add[layer.index] = tuple(ids[0] for ids in removed_by_group)
        width = max(map(len, [*weakest.values(), *strongest.values()]), default=0)
        if max_passes is not None:
            width = _affordable_width(kl, current, weakest, strongest, unit_drop, unit_add, cost, width,
                                      max_passes - passes, candidates_per_round)
            if width == 0:
                stopped = BUDGET_SPENT
                break
            weakest = {index: ids[:width] for index, ids in weakest.items()}
            strongest = {index: ids[:width] for index, ids in strongest.items()}
        widths.append(width)
        missing = [probe for probe in _probes(weakest, strongest, unit_drop, unit_add) if probe not in cost]
        if missing:
            probe_maps = [_moved(current, **{kind: (index, experts)}) for kind, index, experts in missing]
            passes += sum(kl.nominal_shares(probe_maps))
            kls = kl.means(probe_maps)
            cost.update({probe: value - history[-1] for probe, value in zip(missing, kls)})
        estimates = [
            _Move((a, drop), (b, add), cost[("drop", a, drop)] + cost[("add", b, add)])
            for a, drops in weakest.items() for b, adds in strongest.items() for drop in drops for add in adds
        ] + [
            _Move((a, unit_drop[a]), (b, unit_add[b]), cost[("drop", a, unit_drop[a])] + cost[("add", b, unit_add[b])])
            for a in unit_drop for b in unit_add if a != b
        ]
        estimates.sort(key=lambda move: (move.estimate, move.drop, move.add))
        shortlist = []
        for move in estimates:
            if move.estimate >= 0 or len(shortlist) == candidates_per_round:
                break
            if rebuildable(move.apply(current)):
                shortlist.append(move)
        if not shortlist:
            stopped = NO_BETTER_MOVE
            break
        shortlisted = [move.apply(current) for move in shortlist]
        passes += sum(kl.nominal_shares(shortlisted))
        measured = kl.per_sequence(shortlisted, offer_as_base=True)
        best = min(range(len(shortlist)), key=lambda i: (measured[i][0], i))
        if measured[best][0] >= history[-1]:
            stopped = NO_BETTER_MOVE
            break
        if min_move_gain_se and gain_in_standard_errors(base_per_sequence, measured[best][1]) <= min_move_gain_se:
            stopped = BELOW_GAIN_FLOOR
            break
        current = shortlist[best].apply(current)
        touched = {shortlist[best].drop[0], shortlist[best].add[0]}
        cost = {probe: change for probe, change in cost.items() if probe[1] not in touched}
        moves_taken.append(shortlist[best].to_dict())
        history.append(measured[best][0])
    return RefinedKeepMap(current, moves_taken, history, stopped, widths, passes)


def _probes(weakest: dict, strongest: dict, unit_drop: dict, unit_add: dict) -> list[tuple[str, int, tuple]]:
    """A round's probes: (kind, layer, experts) for each single expert and each grouped unit."""
    return ([("drop", i, e) for i, ids in weakest.items() for e in ids]
            + [("add", i, e) for i, ids in strongest.items() for e in ids]
            + [("drop", i, e) for i, e in unit_drop.items()] + [("add", i, e) for i, e in unit_add.items()])


def _affordable_width(kl: MaskedKL, current: dict[int, list[int]], weakest: dict, strongest: dict, unit_drop: dict,
                      unit_add: dict, known: dict, width: int, passes_left: float, candidates: int) -> int:
    """The widest probe width, at most ``width``, whose round fits in ``passes_left``: the probes not in ``known``
    (each its :meth:`MaskedKL.nominal_shares` share) and the shortlist (``candidates`` full passes at most); 0 when
    not even width 1 fits."""
    pending = [probe for probe in _probes(weakest, strongest, unit_drop, unit_add) if probe not in known]
    maps = [_moved(current, **{kind: (index, experts)}) for kind, index, experts in pending]
    share = dict(zip(pending, kl.nominal_shares(maps)))
    while width > 0:
        narrowed = _probes({i: ids[:width] for i, ids in weakest.items()},
                           {i: ids[:width] for i, ids in strongest.items()}, unit_drop, unit_add)
        if sum(share[probe] for probe in narrowed if probe not in known) + candidates <= passes_left:
            return width
        width -= 1
    return 0
