"""GPT-OSS: top-k on biased router logits then softmax over the k; interleaved gate/up with biases."""

from .base import MoEFamily
from .registry import register_family

GPT_OSS = register_family(
    MoEFamily(
        model_type="gpt_oss",
        num_experts_field="num_local_experts",
        router_attr="router",
        router_expert_tensors=("weight", "bias"),
        expert_tensors=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
        expert_output_tensors=("down_proj", "down_proj_bias"),
        renormalizes_top_k=True,
        notes="The softmax runs over the k chosen logits, so kept experts keep their weight ratios.",
    )
)
