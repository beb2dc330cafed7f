"""Expert surgery: remove routed experts from a live model, layer by layer.

``prune_experts(model, keep)`` validates the whole keep map first (so a bad entry changes nothing), then slices
the router rows, router biases, DeepSeek-V3's ``e_score_correction_bias`` and the fused expert tensors with
``index_select`` along the expert dimension, updates every stored expert count, clamps top-k, and turns the
model into a ``diep_<family>`` model whose config records the per-layer counts and the original ids kept.

Removing expert j is defined as routing as if j's router logit were -inf: kept experts keep their order, so the
router picks among the same candidates and (for families that renormalise) with the same weight ratios.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint.format import PerLayerPlan, adopt_diep_format, current_layer_plans
from .errors import KeepMapError
from .families import MoELayer, RoutingRules, get_family

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSurgery:
    """What will be done to one layer, decided and checked before anything is touched."""

    layer: MoELayer
    keep_ids: tuple[int, ...]
    new_top_k: int
    regroup: bool
    n_group: int | None
    topk_group: int | None


def active_groups(layer: MoELayer, config, regroup: bool = False) -> int:
    """How many routing groups constrain what a layer may keep: n_group under active grouped routing, else 1."""
    return layer.family.routing_rules(layer, config, regroup).n_group


def group_subsets(num_experts: int, kept: int, n_group: int) -> list[tuple[int, ...]]:
    """Every keep set of ``kept`` experts that grouped routing accepts (the same count from each of the n_group
    contiguous groups), as sorted tuples; with n_group = 1 every ``kept``-subset."""
    if n_group <= 1:
        return list(itertools.combinations(range(num_experts), kept))
    size, per_group = num_experts // n_group, kept // n_group
    per_group_choices = [itertools.combinations(range(g * size, (g + 1) * size), per_group) for g in range(n_group)]
    return [tuple(itertools.chain.from_iterable(parts)) for parts in itertools.product(*per_group_choices)]


def count_group_subsets(num_experts: int, kept: int, n_group: int) -> int:
    """len(group_subsets(...)) without building them."""
    if n_group <= 1:
        return math.comb(num_experts, kept)
    return math.comb(num_experts // n_group, kept // n_group) ** n_group


def plan_surgery(
    model: nn.Module,
    keep: Mapping[int, Iterable[int]],
    *,
    regroup: bool | Iterable[int] = False,
    allow_below_top_k: bool = False,
) -> list[LayerSurgery]:
    """Check a keep map against a model and return the per-layer plan. Raises KeepMapError; changes nothing."""
    family = get_family(model)
    layers = {layer.index: layer for layer in family.moe_layers(model)}
    if not isinstance(keep, Mapping):
        raise KeepMapError(f"keep must be a mapping {{layer index: [expert ids]}}, got {type(keep).__name__}")
    regroup_layers = set(layers) if regroup is True else set(regroup or ())
    unknown_regroup = regroup_layers - set(layers)
    if unknown_regroup:
        raise KeepMapError(f"regroup names layers {sorted(unknown_regroup)} that are not MoE layers {sorted(layers)}")

    plan = []
    for raw_index, raw_ids in keep.items():
        index = _as_int(raw_index, f"keep map key {raw_index!r}")
        if index not in layers:
            raise KeepMapError(
                f"layer {index} is not a MoE layer of this {family.model_type} model; MoE layers are {sorted(layers)}"
            )
        layer = layers[index]
        num_experts = layer.num_experts
        ids = [_as_int(i, f"layer {index}: expert id {i!r}") for i in raw_ids]
        _check_ids(index, ids, num_experts)
        rules = family.routing_rules(layer, model.config)
        top_k = rules.top_k
        floor = rules.floor(groups=False, allow_below_top_k=allow_below_top_k)
        if len(ids) < floor:
            reason = f"top-k is {top_k}" if floor == top_k and not allow_below_top_k else ""
            minimum = f"{family.model_type} needs at least {rules.min_experts}" if rules.min_experts > 1 else ""
            why = "; ".join(r for r in (reason, minimum) if r)
            raise KeepMapError(
                f"layer {index} would keep {len(ids)} expert(s) but needs at least {floor} ({why}); "
                f"keep between {floor} and {num_experts} experts"
                + ("" if allow_below_top_k else ", or pass allow_below_top_k=True to lower top-k")
            )
        offloaded = [
            name
            for owner, names in ((layer.router, family.router_expert_tensors), (layer.experts, family.expert_tensors))
            for name in names
            if getattr(owner, name, None) is not None and getattr(owner, name).device.type == "meta"
        ]
        if offloaded:
            raise KeepMapError(
                f"layer {index}: tensors {offloaded} are offloaded to disk (meta device), so they cannot be sliced; "
                "load the model with a device_map that keeps expert weights on CPU or GPU for pruning"
            )
        n_group, topk_group = family.routing_groups(layer) or (None, None)
        do_regroup = index in regroup_layers and rules.grouped
        if rules.grouped and not do_regroup:
            _check_groups(rules, index, len(ids))
            _check_group_membership(index, ids, num_experts, rules.n_group)
        if do_regroup:
            n_group, topk_group = 1, 1
        plan.append(
            LayerSurgery(
                layer=layer,
                keep_ids=tuple(ids),
                new_top_k=min(top_k, len(ids)),
                regroup=do_regroup,
                n_group=n_group,
                topk_group=topk_group,
            )
        )
    return plan


def _as_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)) and not hasattr(value, "__index__"):
        raise KeepMapError(f"{what} must be an integer")
    return int(value)


def _check_ids(index: int, ids: list[int], num_experts: int) -> None:
    if not ids:
        raise KeepMapError(f"layer {index} keeps no experts; a MoE layer must keep at least one (it has {num_experts})")
    bad = [i for i in ids if not 0 <= i < num_experts]
    if bad:
        raise KeepMapError(f"layer {index}: expert ids {bad} are out of range; this layer has ids 0..{num_experts - 1}")
    seen, duplicates = set(), []
    for i in ids:
        if i in seen:
            duplicates.append(i)
        seen.add(i)
    if duplicates:
        raise KeepMapError(f"layer {index}: expert ids {sorted(set(duplicates))} are listed more than once")


def _check_groups(rules: RoutingRules, index: int, kept: int) -> None:
    n_group, per_group_min = rules.n_group, rules.min_per_group
    if not rules.divides(kept):
        allowed = ", ".join(str(n_group * m) for m in range(per_group_min, per_group_min + 4))
        raise KeepMapError(
            f"layer {index} would keep {kept} experts, but its grouped routing (n_group={n_group}) needs a multiple "
            f"of {n_group} with at least {per_group_min} per group ({allowed}, ...); keep such a count, or pass "
            f"regroup=[{index}] to route that layer without groups (n_group = topk_group = 1)"
        )
    if not rules.supplies_top_k(kept):
        raise KeepMapError(
            f"layer {index}: {rules.topk_group} selected group(s) of {kept // n_group} experts cannot supply "
            f"top-k={rules.top_k}; keep at least {n_group * -(-rules.top_k // rules.topk_group)} experts or pass "
            f"regroup=[{index}]"
        )


def _check_group_membership(index: int, ids: list[int], num_experts: int, n_group: int) -> None:
    """Kept experts must stay in their own group: surgery cuts the kept list into n_group contiguous groups again,
    so position block g must hold experts of original group g only (then routing equals masking the removed)."""
    size, per_group = num_experts // n_group, len(ids) // n_group
    for g in range(n_group):
        block = ids[g * per_group : (g + 1) * per_group]
        strays = [i for i in block if i // size != g]
        if strays:
            groups = ", ".join(f"{h}: {h * size}-{(h + 1) * size - 1}" for h in range(n_group))
            raise KeepMapError(
                f"layer {index}: grouped routing (n_group={n_group}; groups {groups}) needs the same number of kept "
                f"experts from every group, listed group by group; positions {g * per_group}-"
                f"{(g + 1) * per_group - 1} should hold {per_group} experts of group {g}, but hold {strays} from "
                f"other groups; keep {per_group} of each group in group order, or pass regroup=[{index}] to route "
                "that layer without groups"
            )


def _slice_expert_dim(module: nn.Module, name: str, index: torch.Tensor) -> None:
    """Replace ``module.<name>`` (parameter or buffer) by its rows ``index`` along dim 0, as a fresh tensor."""
    tensor = getattr(module, name)
    sliced = tensor.detach().index_select(0, index.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
    else:
        module.register_buffer(name, sliced, persistent=name not in module._non_persistent_buffers_set)


def _apply(surgery: LayerSurgery) -> None:
    layer = surgery.layer
    family = layer.family
    index = torch.tensor(surgery.keep_ids, dtype=torch.long)
    for name in family.router_expert_tensors:
        if getattr(layer.router, name, None) is not None:
            _slice_expert_dim(layer.router, name, index)
    for name in family.expert_tensors:
        if getattr(layer.experts, name, None) is not None:
            _slice_expert_dim(layer.experts, name, index)
    kept = len(surgery.keep_ids)
    for dotted in family.count_attrs:
        owner, attr = layer.resolve(dotted)
        setattr(owner, attr, kept)
    for dotted in family.top_k_attrs:
        owner, attr = layer.resolve(dotted)
        setattr(owner, attr, surgery.new_top_k)
    if surgery.regroup:
        family.set_routing_groups(layer.router, 1, 1)


def prune_experts(
    model: nn.Module,
    keep: Mapping[int, Iterable[int]],
    *,
    regroup: bool | Iterable[int] = False,
    allow_below_top_k: bool = False,
) -> nn.Module:
    """Remove routed experts in place and return the model as a ``diep_<family>`` model.

    Args:
        model: a supported MoE causal LM (stock or already pruned).
        keep: ``{layer index: expert ids to keep}``; ids index the layer's current experts and their order is the
            new order. Layers absent from the map stay whole.
        regroup: layers (or True for all) whose group-limited routing is reset to ``n_group = topk_group = 1``
            instead of requiring a kept count divisible by ``n_group`` (DeepSeek). Changes routing: documented
            in the card.
        allow_below_top_k: let a layer keep fewer experts than top-k (top-k is then lowered to the kept count).

    Raises:
        UnsupportedModelError: dense or unknown model.
        KeepMapError: a bad layer index, id, duplicate, empty layer, count below the floor, or group violation;
            raised before the model is modified.
    """
    plan = plan_surgery(model, keep, regroup=regroup, allow_below_top_k=allow_below_top_k)
    family = get_family(model)
    before = current_layer_plans(model, family)
    for surgery in plan:
        _apply(surgery)
        logger.info(
            "layer %d: kept %d of %d experts (top-k %d)",
            surgery.layer.index,
            len(surgery.keep_ids),
            before[surgery.layer.index].num_experts,
            surgery.new_top_k,
        )
    after = dict(before)
    for surgery in plan:
        previous = before[surgery.layer.index]
        after[surgery.layer.index] = PerLayerPlan(
            num_experts=len(surgery.keep_ids),
            original_num_experts=previous.original_num_experts,
            kept_original_ids=[previous.kept_original_ids[i] for i in surgery.keep_ids],
            n_group=surgery.n_group,
            topk_group=surgery.topk_group,
        )
    return adopt_diep_format(model, family, after)
