"""Tiny models of every supported family, built from configs (random weights, seeded), for mechanics tests.

One row a family (QUIRKS): adding a family to diep_hub means adding its row here, and every table-driven test covers it.
"""

from __future__ import annotations

import itertools

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from diep_hub.zoo.configs import expert_ffn_field, family_kwargs

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# Every family: 8 routed experts, top-2, experts of FFN width 24 where the family sizes them apart from the dense
# FFN (else COMMON's 48), head size 8; plus each family's own quirks (shared experts, dense first layer, grouped
# routing, router scaling...). The family field names come from diep_hub.zoo.configs, the zoo's own table.
QUIRKS: dict[str, dict] = {
    "mixtral": {},
    "qwen2_moe": dict(shared_expert_intermediate_size=40),
    "qwen3_moe": dict(norm_topk_prob=True),
    "olmoe": {},
    "deepseek_v2": dict(first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=1.0),
    "deepseek_v3": dict(first_k_dense_replace=1, n_shared_experts=1, n_group=2, topk_group=1),
    "gpt_oss": {},
    "phimoe": {},
    "granitemoe": {},
}

FAMILY_CONFIGS: dict[str, dict] = {
    model_type: family_kwargs(
        model_type,
        experts=8,
        top_k=2,
        expert_ffn=24 if expert_ffn_field(model_type) != "intermediate_size" else None,
        attention=(COMMON["num_attention_heads"], 8),
        **quirks,
    )
    for model_type, quirks in QUIRKS.items()
}

FAMILIES = sorted(FAMILY_CONFIGS)


def tiny_config(model_type: str, **overrides):
    kwargs = {**COMMON, **FAMILY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A tiny model with non-trivial routing: router rows drawn larger than the init so experts differ."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # e_score_correction_bias is a buffer: randomise it too, or a wrongly sliced bias would go unnoticed.
        for name, param in itertools.chain(model.named_parameters(), model.named_buffers()):
            # Routers start at zero in some families (every expert tied): give them real preferences.
            if name.endswith(("gate.weight", "router.weight")) and param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif name.endswith(("router.bias", "e_score_correction_bias")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def float64_tiny_model(model_type: str, **overrides):
    """``tiny_model`` in float64 with the eager experts (grouped_mm has no float64 kernel): for checks of two
    routes to the same maths where float32 rounding would blur the small differences pruning makes."""
    model = tiny_model(model_type, **overrides).double()
    model.config._experts_implementation = "eager"
    return model


def dense_model():
    """A dense Llama of the tiny models' common size: no experts, what every MoE-only entry point refuses."""
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **COMMON)).eval()


def sample_input_ids(batch: int = 2, length: int = 9, seed: int = 0, vocab_size: int = COMMON["vocab_size"]):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=generator)
