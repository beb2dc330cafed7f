"""Mixtral: softmax over all experts, top-k, weights always renormalised over the k chosen."""

from .base import MoEFamily
from .registry import register_family

MIXTRAL = register_family(
    MoEFamily(
        model_type="mixtral",
        num_experts_field="num_local_experts",
        renormalizes_top_k=True,
        notes="Top-k weights are renormalised, so kept experts keep their weight ratios after pruning.",
    )
)
