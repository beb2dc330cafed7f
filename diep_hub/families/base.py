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


@dataclass(frozen=True)
class GroupedRouting:
    """Group-limited routing (DeepSeek): experts are split into ``n_group`` contiguous groups.

    ``router_group_attr`` / ``router_topk_group_attr`` name the router attributes that hold the group counts.
    ``min_per_group`` is how many experts a group needs for its group score (DeepSeek-V3 sums the top 2).
    ``active_when`` returns whether grouping is in use for a config (DeepSeek-V2 groups only with
    ``topk_method == "group_limited_greedy"``).
    """

    router_group_attr: str = "num_group"
    router_topk_group_attr: str = "topk_group"
    min_per_group: int = 1
    active_when: Any = None  # Callable[[config], bool] | None; None means "whenever n_group > 1"

    def is_active(self, config) -> bool:
        n_group = getattr(config, "n_group", None) or 1
        if self.active_when is not None and not self.active_when(config):
            return False
        return n_group > 1


@dataclass(frozen=True)
class MoEFamily:
    """What diep_hub needs to know about one transformers MoE family.

    Attributes:
        model_type: the transformers ``model_type`` this adapter serves.
        num_experts_field: config field holding the routed-expert count.
        top_k_field: config field holding the number of experts each token uses.
        block_attr: attribute of a decoder layer that holds the MoE block.
        router_attr: attribute of the block that holds the router.
        experts_attr: attribute of the block that holds the fused experts.
        router_expert_tensors: router parameters/buffers indexed by expert on dim 0.
        expert_tensors: experts parameters indexed by expert on dim 0.
        count_attrs: attributes (on block, router or experts) that store the expert count and must follow it.
        top_k_attrs: attributes that store top-k and must be clamped to the kept count.
        min_experts: the smallest number of experts a layer may keep beyond top-k (PhiMoE's sparsemixer needs 2).
        renormalizes_top_k: whether routing weights are renormalised over the chosen k; when False, pruning
            changes the gate values and the card says so. Either a bool or the name of a config flag.
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
    count_attrs: tuple[str, ...] = ("router.num_experts", "experts.num_experts")
    top_k_attrs: tuple[str, ...] = ("router.top_k",)
    min_experts: int = 1
    renormalizes_top_k: bool | str = True
    grouped_routing: GroupedRouting | None = None
    shared_expert_attrs: tuple[str, ...] = ()
    notes: str = ""
    extra: dict = field(default_factory=dict)

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

    def layer_floor(self, config, top_k: int | None = None) -> int:
        """Fewest experts a layer may keep: max(top-k, family minimum, grouped-routing minimum)."""
        top_k = self.top_k(config) if top_k is None else top_k
        floor = max(top_k, self.min_experts)
        if self.grouped_routing is not None and self.grouped_routing.is_active(config):
            floor = max(floor, config.n_group * self.grouped_routing.min_per_group)
        return floor


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
