"""Qwen2-MoE: softmax top-k, renormalised only with norm_topk_prob; a sigmoid-gated shared expert."""

from .base import MoEFamily
from .registry import register_family

QWEN2_MOE = register_family(
    MoEFamily(
        model_type="qwen2_moe",
        num_experts_field="num_experts",
        renormalizes_top_k="norm_topk_prob",
        shared_expert_attrs=("shared_expert", "shared_expert_gate"),
        notes="Without norm_topk_prob the softmax runs over fewer experts after pruning, so gate values grow.",
    )
)
