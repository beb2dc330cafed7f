"""GraniteMoE: top-k on router logits, softmax over the k; the block lives at .block_sparse_moe."""

from .base import MoEFamily
from .registry import register_family

GRANITEMOE = register_family(
    MoEFamily(
        model_type="granitemoe",
        num_experts_field="num_local_experts",
        block_attr="block_sparse_moe",
        router_attr="router",
        renormalizes_top_k=True,
        notes="The softmax runs over the k chosen logits, so kept experts keep their weight ratios.",
    )
)
