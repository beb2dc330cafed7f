"""Qwen3-MoE: softmax top-k, renormalised only with norm_topk_prob; no shared expert."""

from .base import MoEFamily
from .registry import register_family

QWEN3_MOE = register_family(
    MoEFamily(
        model_type="qwen3_moe",
        num_experts_field="num_experts",
        renormalizes_top_k="norm_topk_prob",
        notes="Without norm_topk_prob the softmax runs over fewer experts after pruning, so gate values grow.",
    )
)
