"""PhiMoE: sparsemixer routing, hard-wired top-2; a layer left with one expert produces NaN."""

from .base import MoEFamily
from .registry import register_family

PHIMOE = register_family(
    MoEFamily(
        model_type="phimoe",
        num_experts_field="num_local_experts",
        router_attr="router",
        count_attrs=("router.num_experts", "experts.num_experts", "block.num_experts"),
        top_k_attrs=("router.top_k", "block.top_k"),
        min_experts=2,
        renormalizes_top_k=True,
        notes="sparsemixer needs at least two experts in every layer.",
    )
)
