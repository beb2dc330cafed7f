"""OLMoE: softmax top-k over 64 experts, renormalised only with norm_topk_prob."""

from .base import MoEFamily
from .registry import register_family

OLMOE = register_family(
    MoEFamily(
        model_type="olmoe",
        num_experts_field="num_experts",
        renormalizes_top_k="norm_topk_prob",
        notes="Without norm_topk_prob the softmax runs over fewer experts after pruning, so gate values grow.",
    )
)
