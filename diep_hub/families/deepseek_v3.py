"""DeepSeek-V3: sigmoid scores, group-limited top-k with a selection-only e_score_correction_bias."""

from .base import GroupedRouting, MoEFamily
from .registry import register_family

DEEPSEEK_V3 = register_family(
    MoEFamily(
        model_type="deepseek_v3",
        num_experts_field="n_routed_experts",
        router_expert_tensors=("weight", "e_score_correction_bias"),
        # The router scores groups by their top-2 experts even with n_group = 1 (a regrouped layer), so a layer
        # with one expert fails at run time: every layer keeps at least two.
        min_experts=2,
        renormalizes_top_k="norm_topk_prob",
        # Each expert is scored by its own sigmoid (no distribution over experts).
        router_activation="sigmoid",
        # Each group is scored by the sum of its top-2 experts, so a group needs two experts.
        grouped_routing=GroupedRouting(min_per_group=2),
        shared_expert_attrs=("shared_experts",),
        notes="Grouped routing splits the experts into n_group contiguous groups: a layer keeps the same number "
        "of experts (at least 2) from every group, listed group by group, or is explicitly regrouped to "
        "n_group = topk_group = 1.",
    )
)
