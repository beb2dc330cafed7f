"""The ``diep_<family>`` checkpoint format: per-layer expert counts in the config, remote code beside it.

A pruned model stays the same Python object: its config becomes the family's diep config (same fields plus
per-layer counts, original counts and kept ids) and its class becomes the matching ``DiepXForCausalLM``, a
subclass of the family's own class that only adds per-layer block construction and a per-layer auxiliary loss.
Keeping the object keeps accelerate's device-map hooks and avoids a second copy of the weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DiEPError
from ..families import MoEFamily, get_family
from ..modeling import DIEP_CONFIG_CLASSES, DIEP_MODEL_CLASSES

PER_LAYER_FIELDS = ("num_experts_per_layer", "original_num_experts", "kept_expert_ids")
GROUP_FIELDS = ("n_group_per_layer", "topk_group_per_layer")


@dataclass(frozen=True)
class PerLayerPlan:
    """The state of one MoE layer as recorded in a pruned config."""

    num_experts: int
    original_num_experts: int
    kept_original_ids: list[int]
    n_group: int | None = None
    topk_group: int | None = None


def is_pruned(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", "").startswith("diep_")


def current_layer_plans(model: nn.Module, family: MoEFamily | None = None) -> dict[int, PerLayerPlan]:
    """Per-layer state of a stock or pruned model, with ids expressed in the original model's numbering."""
    family = family or get_family(model)
    config = model.config
    kept_ids = getattr(config, "kept_expert_ids", None)
    original = getattr(config, "original_num_experts", None)
    plans = {}
    for layer in family.moe_layers(model):
        n_group, topk_group = family.routing_groups(layer) or (None, None)
        if kept_ids is not None and kept_ids[layer.index] is not None:
            ids, total = list(kept_ids[layer.index]), original[layer.index]
        else:
            ids, total = list(range(layer.num_experts)), layer.num_experts
        plans[layer.index] = PerLayerPlan(layer.num_experts, total, ids, n_group, topk_group)
    return plans


def adopt_diep_format(model: nn.Module, family: MoEFamily, plans: dict[int, PerLayerPlan]) -> nn.Module:
    """Record ``plans`` in a diep config and give the model the matching diep class, in place."""
    diep_type = f"diep_{family.model_type}"
    old_config = model.config
    config = copy.copy(old_config)
    config.__class__ = DIEP_CONFIG_CLASSES[diep_type]
    config.__dict__.pop("model_type", None)  # a loaded config may carry the base type as an instance attribute
    num_layers = config.num_hidden_layers
    config.num_experts_per_layer = [plans[i].num_experts if i in plans else None for i in range(num_layers)]
    config.original_num_experts = [plans[i].original_num_experts if i in plans else None for i in range(num_layers)]
    config.kept_expert_ids = [list(plans[i].kept_original_ids) if i in plans else None for i in range(num_layers)]
    if family.has_grouped_routing:
        config.n_group_per_layer = [plans[i].n_group if i in plans else None for i in range(num_layers)]
        config.topk_group_per_layer = [plans[i].topk_group if i in plans else None for i in range(num_layers)]
    # The family field holds the widest layer, so a fresh build allocates no more than it needs.
    setattr(config, family.num_experts_field, max(p.num_experts for p in plans.values()))
    # The checks a reload runs (configuration_diep): a plan that would not load is refused before it is adopted.
    config.diep_validate_per_layer()
    for module in model.modules():
        if getattr(module, "config", None) is old_config:
            module.config = config
    model.__class__ = DIEP_MODEL_CLASSES[diep_type]
    return model


def uniform_expert_count(model: nn.Module) -> int | None:
    """The common expert count when every MoE layer keeps the same number and routing groups are unchanged."""
    family = get_family(model)
    plans = current_layer_plans(model, family)
    counts = {p.num_experts for p in plans.values()}
    groups = {(p.n_group, p.topk_group) for p in plans.values()}
    if len(counts) != 1 or len(groups) != 1:
        return None
    return counts.pop()


def to_stock_model(model: nn.Module) -> nn.Module:
    """A stock-architecture model sharing the pruned model's tensors (no remote code needed to load it).

    Only possible when every MoE layer keeps the same number of experts: the family config then describes the
    whole model, and engines such as vLLM load it as they are.
    """
    family = get_family(model)
    count = uniform_expert_count(model)
    if count is None:
        counts = [p.num_experts for p in current_layer_plans(model, family).values()]
        raise DiEPError(
            f"the stock {family.model_type} architecture needs the same expert count in every MoE layer and "
            f"unchanged routing groups; this model keeps {counts}: save it in the diep_{family.model_type} format"
        )
    stock_config_class = next(
        cls for cls in type(model.config).__mro__ if getattr(cls, "model_type", "") == family.model_type
    )
    stock_model_class = next(
        cls for cls in type(model).__mro__[1:] if getattr(cls, "__module__", "").startswith("transformers.")
    )
    config = copy.copy(model.config)
    config.__class__ = stock_config_class
    config.__dict__.pop("model_type", None)
    for field in PER_LAYER_FIELDS + GROUP_FIELDS + ("diep_pruning", "diep_skipping", "auto_map"):
        config.__dict__.pop(field, None)
    setattr(config, family.num_experts_field, count)
    family.set_top_k(config, min(family.top_k(config), count))
    plans = current_layer_plans(model, family)
    first = next(iter(plans.values()))
    if first.n_group is not None:
        family.set_config_groups(config, first.n_group, first.topk_group)
    with torch.device("meta"):
        stock = stock_model_class(config)
    stock.load_state_dict(model.state_dict(), assign=True, strict=True)
    return stock
