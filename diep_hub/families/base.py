"""The uniform view of a Mixture-of-Experts layer that the rest of diep_hub works against.

A family adapter describes where a family keeps its MoE blocks and which of their tensors are indexed by
expert, so that criteria, surgery and skipping never look at family quirks. Layouts were read off
transformers 5.23 (see shared/docs/transformers5-moe.md): every supported family stores its routed experts
fused, ``gate_up_proj`` [E, ...] and ``down_proj`` [E, ...], and routes with a separate router module whose
``weight`` is [E, H].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

#: how a router turns logits into expert scores: a softmax over the experts, or an independent sigmoid each
ROUTER_ACTIVATIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class GroupedRouting:
    """Group-limited routing (DeepSeek): experts are split into ``n_group`` contiguous groups.

    ``router_group_attr`` / ``router_topk_group_attr`` name the router attributes that hold the group counts,
    ``config_group_field`` / ``config_topk_group_field`` the config fields a stock config holds them in.
    ``min_per_group`` is how many experts a group needs for its group score (DeepSeek-V3 sums the top 2).
    ``active_when`` returns whether grouping is in use for a config (DeepSeek-V2 groups only with
    ``topk_method == "group_limited_greedy"``).
    """

    router_group_attr: str = "num_group"
    router_topk_group_attr: str = "topk_group"
    config_group_field: str = "n_group"
    config_topk_group_field: str = "topk_group"
    min_per_group: int = 1
    active_when: Any = None  # Callable[[config], bool] | None; None means "whenever n_group > 1"

    def is_active(self, config) -> bool:
        n_group = getattr(config, self.config_group_field, None) or 1
        if self.active_when is not None and not self.active_when(config):
            return False
        return n_group > 1


@dataclass(frozen=True)
class RoutingRules:
    """What one MoE layer's routing requires of the experts it keeps; the one source of every per-layer floor.

    Surgery, selection and NAEE all read these, so they never disagree on which kept counts a layer accepts.

    Attributes:
        top_k: experts each token uses in this layer.
        min_experts: the family's own minimum (PhiMoE's sparsemixer and DeepSeek-V3's group score need 2).
        n_group: routing groups that constrain the kept set (1: none, or grouping off / regrouped).
        topk_group: groups each token may pick from (1 when not grouped).
        min_per_group: experts a group needs to be scored (1 when not grouped).
    """

    top_k: int
    min_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    min_per_group: int = 1

    @property
    def grouped(self) -> bool:
        return self.n_group > 1

    @property
    def group_floor(self) -> int:
        """Fewest experts grouped routing accepts: n_group x max(min_per_group, ceil(top_k / topk_group)); 0 if
        not grouped (topk_group groups of kept / n_group experts must still supply top-k)."""
        if not self.grouped:
            return 0
        return self.n_group * max(self.min_per_group, -(-self.top_k // self.topk_group))

    def floor(self, *, groups: bool = True, allow_below_top_k: bool = False) -> int:
        """Fewest experts the layer may keep: max(top-k, family minimum, grouped-routing minimum).

        Args:
            groups: include the grouped-routing minimum (surgery checks groups separately, with its own words).
            allow_below_top_k: leave top-k out (top-k is then lowered to the kept count).
        """
        floor = self.min_experts if allow_below_top_k else max(self.top_k, self.min_experts)
        return max(floor, self.group_floor) if groups else floor

    def divides(self, kept: int) -> bool:
        """Whether ``kept`` splits into n_group equal groups of at least min_per_group experts."""
        return kept % self.n_group == 0 and kept // self.n_group >= self.min_per_group

    def supplies_top_k(self, kept: int) -> bool:
        """Whether topk_group groups of kept / n_group experts hold top-k experts."""
        return self.topk_group * (kept // self.n_group) >= self.top_k

    def accepts(self, kept: int) -> bool:
        """Whether grouped routing accepts ``kept`` experts (always, when not grouped)."""
        return not self.grouped or (self.divides(kept) and self.supplies_top_k(kept))


@dataclass(frozen=True)
class MoEFamily:
    """What diep_hub needs to know about one transformers MoE family.

    Attributes:
        model_type: the transformers ``model_type`` this adapter serves.
        num_experts_field: config field holding the routed-expert count.
        top_k_field: config field holding the number of experts each token uses (stock configs; a pruned layer's
            own top-k lives on its router).
        block_attr: attribute of a decoder layer that holds the MoE block.
        router_attr: attribute of the block that holds the router.
        experts_attr: attribute of the block that holds the fused experts.
        router_expert_tensors: router parameters/buffers indexed by expert on dim 0.
        expert_tensors: experts parameters indexed by expert on dim 0.
        expert_output_tensors: those of ``expert_tensors`` that form the expert's last linear map (its weight,
            and its bias where it has one): scaling them by s scales the expert's output by s (router
            recalibration's output scales).
        count_attrs: attributes (on block, router or experts) that store the expert count and must follow it.
        top_k_attrs: attributes that store top-k and must be clamped to the kept count.
        min_experts: the smallest number of experts a layer may keep beyond top-k (PhiMoE's sparsemixer needs 2).
        renormalizes_top_k: whether routing weights are renormalised over the chosen k; when False, pruning
            changes the gate values and the card says so. Either a bool or the name of a config flag.
        router_activation: how the router scores experts from its logits, one of ``ROUTER_ACTIVATIONS``
            ("softmax" over all experts, or "sigmoid" each, as DeepSeek-V3).
        grouped_routing: present for families with group-limited routing.
        shared_expert_attrs: block attributes holding always-on experts, never pruned nor counted.
        notes: one line for the card and the docs about routing after pruning.
    """

    model_type: str
    num_experts_field: str
    top_k_field: str = "num_experts_per_tok"
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    router_expert_tensors: tuple[str, ...] = ("weight",)
    expert_tensors: tuple[str, ...] = ("gate_up_proj", "down_proj")
    expert_output_tensors: tuple[str, ...] = ("down_proj",)
    count_attrs: tuple[str, ...] = ("router.num_experts", "experts.num_experts")
    top_k_attrs: tuple[str, ...] = ("router.top_k",)
    min_experts: int = 1
    renormalizes_top_k: bool | str = True
    router_activation: str = "softmax"
    grouped_routing: GroupedRouting | None = None
    shared_expert_attrs: tuple[str, ...] = ()
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.router_activation not in ROUTER_ACTIVATIONS:
            raise ValueError(
                f"family {self.model_type!r}: router_activation={self.router_activation!r}; "
                f"expected one of {list(ROUTER_ACTIVATIONS)}"
            )
        if self.min_experts < 1:
            raise ValueError(f"family {self.model_type!r}: min_experts={self.min_experts!r} must be >= 1")

    # ----------------------------------------------------------------------------------------------------
    # Reading a model
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if layers is None:
            raise AttributeError(f"{type(model).__name__} has no decoder layers at .model.layers")
        return layers

    def block(self, layer: nn.Module) -> nn.Module | None:
        """The MoE block of a decoder layer, or None for a dense layer."""
        block = getattr(layer, self.block_attr, None)
        if block is None or not hasattr(block, self.router_attr) or not hasattr(block, self.experts_attr):
            return None
        return block

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """Every MoE layer of the model, in depth order; dense layers are skipped."""
        found = []
        for index, layer in enumerate(self.decoder_layers(model)):
            block = self.block(layer)
            if block is not None:
                found.append(MoELayer(family=self, index=index, block=block))
        return found

    def moe_layer_indices_from_config(self, config) -> list[int]:
        """MoE layer indices derived from the config alone (used before weights exist, e.g. dry runs)."""
        first_dense = getattr(config, "first_k_dense_replace", None) or 0
        mlp_only = set(getattr(config, "mlp_only_layers", None) or [])
        step = getattr(config, "decoder_sparse_step", None) or 1
        indices = []
        for i in range(config.num_hidden_layers):
            if i < first_dense or i in mlp_only or (i + 1) % step != 0:
                continue
            indices.append(i)
        return indices

    def renormalizes(self, config) -> bool:
        if isinstance(self.renormalizes_top_k, str):
            return bool(getattr(config, self.renormalizes_top_k, False))
        return self.renormalizes_top_k

    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_field))

    def top_k(self, config) -> int:
        return int(getattr(config, self.top_k_field))

    def set_top_k(self, config, top_k: int) -> None:
        """Write top-k into a (stock) config's own field."""
        setattr(config, self.top_k_field, int(top_k))

    # ----------------------------------------------------------------------------------------------------
    # Routing rules: what the router needs of the experts a layer keeps
    @property
    def has_grouped_routing(self) -> bool:
        """Whether this family can route by groups (then pruned configs record per-layer group counts)."""
        return self.grouped_routing is not None

    def routing_groups(self, layer: MoELayer) -> tuple[int | None, int | None] | None:
        """(n_group, topk_group) as the layer's router holds them (a value may be None when the config left it
        unset), or None for a family without grouped routing. This is the state a pruned config records."""
        grouping = self.grouped_routing
        if grouping is None:
            return None
        return (
            getattr(layer.router, grouping.router_group_attr, None),
            getattr(layer.router, grouping.router_topk_group_attr, None),
        )

    def set_routing_groups(self, router: nn.Module, n_group: int, topk_group: int) -> None:
        """Set a router's group counts (regrouping sets both to 1); a family without groups has none to set."""
        grouping = self.grouped_routing
        if grouping is None:
            raise ValueError(f"{self.model_type} has no grouped routing: there are no routing groups to set")
        setattr(router, grouping.router_group_attr, n_group)
        setattr(router, grouping.router_topk_group_attr, topk_group)

    def set_config_groups(self, config, n_group: int | None, topk_group: int | None) -> None:
        """Write group counts into a stock config's own fields (a no-op for a family without grouped routing)."""
        grouping = self.grouped_routing
        if grouping is None:
            return
        setattr(config, grouping.config_group_field, n_group)
        setattr(config, grouping.config_topk_group_field, topk_group)

    def routing_rules(self, layer: MoELayer, config, regroup: bool = False) -> RoutingRules:
        """The rules of one live layer, read from its router (a pruned layer may have its own top-k and groups).

        Args:
            regroup: the layer will be routed without groups (n_group = topk_group = 1), so groups do not count.
        """
        top_k = layer.top_k
        grouping = self.grouped_routing
        if grouping is None or regroup or (grouping.active_when is not None and not grouping.active_when(config)):
            return RoutingRules(top_k=top_k, min_experts=self.min_experts)
        n_group, topk_group = self.routing_groups(layer)
        n_group = int(n_group or getattr(config, grouping.config_group_field, None) or 1)
        if n_group <= 1:
            return RoutingRules(top_k=top_k, min_experts=self.min_experts)
        return RoutingRules(
            top_k=top_k,
            min_experts=self.min_experts,
            n_group=n_group,
            topk_group=int(topk_group or 1),
            min_per_group=grouping.min_per_group,
        )

    def config_routing_rules(self, config, top_k: int | None = None) -> RoutingRules:
        """The rules every MoE layer of a stock config follows (used before weights exist, e.g. dry runs)."""
        top_k = self.top_k(config) if top_k is None else top_k
        grouping = self.grouped_routing
        if grouping is None or not grouping.is_active(config):
            return RoutingRules(top_k=top_k, min_experts=self.min_experts)
        return RoutingRules(
            top_k=top_k,
            min_experts=self.min_experts,
            n_group=int(getattr(config, grouping.config_group_field)),
            topk_group=int(getattr(config, grouping.config_topk_group_field, None) or 1),
            min_per_group=grouping.min_per_group,
        )

    def min_experts_for(self, layer: MoELayer, config, regroup: bool = False) -> int:
        """Fewest experts a live layer may keep (its floor): max(top-k, family minimum, grouped-routing minimum)."""
        return self.routing_rules(layer, config, regroup).floor()

    def layer_floor(self, config, top_k: int | None = None) -> int:
        """Fewest experts a layer of a stock config may keep: max(top-k, family minimum, grouped-routing minimum)."""
        return self.config_routing_rules(config, top_k).floor()


@dataclass
class MoELayer:
    """One MoE layer of a live model: the block and direct handles on its router and experts."""

    family: MoEFamily
    index: int
    block: nn.Module

    @property
    def router(self) -> nn.Module:
        return getattr(self.block, self.family.router_attr)

    @property
    def experts(self) -> nn.Module:
        return getattr(self.block, self.family.experts_attr)

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    def resolve(self, dotted: str) -> tuple[nn.Module, str]:
        """Turn "router.top_k" into (router module, "top_k"); "block.x" and "experts.x" work the same way."""
        owner_name, attr = dotted.split(".", 1)
        owner = {"block": self.block, "router": self.router, "experts": self.experts}[owner_name]
        return owner, attr
