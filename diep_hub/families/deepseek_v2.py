"""DeepSeek-V2: softmax routing, greedy or group-limited greedy, dense first layers, shared experts."""

from .base import GroupedRouting, MoEFamily
from .registry import register_family

DEEPSEEK_V2 = register_family(
    MoEFamily(
        model_type="deepseek_v2",
        num_experts_field="n_routed_experts",
        renormalizes_top_k=False,
        grouped_routing=GroupedRouting(
            min_per_group=1, active_when=lambda config: getattr(config, "topk_method", None) == "group_limited_greedy"
        ),
        shared_expert_attrs=("shared_experts",),
        notes="Weights are not renormalised (softmax over fewer experts gives larger gates) and are scaled by "
        "routed_scaling_factor; dense layers (first_k_dense_replace) and shared experts are never pruned.",
    )
)
