# Copyright 2026 the diep_hub authors. Apache-2.0.
"""Configs of DiEP-pruned MoE checkpoints (travels with every pruned checkpoint as remote code).

A ``diep_<family>`` config is the family's own config plus per-layer routed-expert counts, so that a layer can
keep a different number of experts than its neighbours. Imports only transformers.

Fields added to the family config (all lists are indexed by decoder layer; dense layers hold ``None``):
    num_experts_per_layer: routed experts each layer keeps.
    original_num_experts: routed experts per layer before pruning.
    kept_expert_ids: for each layer, the original ids of the experts kept, in their new order.
    n_group_per_layer / topk_group_per_layer: grouped routing per layer (DeepSeek), when a layer was regrouped.
    diep_pruning: free-form record of how the checkpoint was made (method, sparsity, seed...).
    diep_skipping: adaptive expert skipping, when calibrated: ``{"enabled": bool, "kernel": "linear"|"rbf",
        "layers": {"<layer index>": {"gamma1": float, "cka_ratio": [[float] * N] * N}}}`` (see modeling_diep.py).

Load-time switch: ``from_pretrained(path, trust_remote_code=True, diep_skipping_enabled=False)`` (or True)
overrides ``diep_skipping["enabled"]``; the model folds the override into ``diep_skipping`` when it is built.
"""

from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    GptOssConfig,
    GraniteMoeConfig,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)


class DiepConfigMixin:
    """Adds per-layer expert counts to a family config and checks them."""

    # name of the family config field holding the expert count; set by each subclass
    diep_num_experts_field: str = ""
    # load-time override of diep_skipping["enabled"]; a plain class attribute (not a saved field) so that
    # from_pretrained(..., diep_skipping_enabled=False) finds it and sets it on the instance
    diep_skipping_enabled = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        counts = getattr(self, "num_experts_per_layer", None)
        if counts is None:
            return
        if len(counts) != self.num_hidden_layers:
            raise ValueError(
                f"num_experts_per_layer has {len(counts)} entries but the model has {self.num_hidden_layers} layers"
            )
        for layer, count in enumerate(counts):
            if count is not None and count < 1:
                raise ValueError(f"layer {layer} keeps {count} experts; every MoE layer needs at least 1")

    def layer_num_experts(self, layer_idx: int) -> int | None:
        counts = getattr(self, "num_experts_per_layer", None)
        if counts is None:
            return getattr(self, self.diep_num_experts_field)
        return counts[layer_idx]

    def layer_top_k(self, layer_idx: int) -> int:
        count = self.layer_num_experts(layer_idx)
        return min(self.num_experts_per_tok, count) if count else self.num_experts_per_tok


class DiepMixtralConfig(DiepConfigMixin, MixtralConfig):
    model_type = "diep_mixtral"
    diep_num_experts_field = "num_local_experts"


class DiepQwen2MoeConfig(DiepConfigMixin, Qwen2MoeConfig):
    model_type = "diep_qwen2_moe"
    diep_num_experts_field = "num_experts"


class DiepQwen3MoeConfig(DiepConfigMixin, Qwen3MoeConfig):
    model_type = "diep_qwen3_moe"
    diep_num_experts_field = "num_experts"


class DiepOlmoeConfig(DiepConfigMixin, OlmoeConfig):
    model_type = "diep_olmoe"
    diep_num_experts_field = "num_experts"


class DiepDeepseekV2Config(DiepConfigMixin, DeepseekV2Config):
    model_type = "diep_deepseek_v2"
    diep_num_experts_field = "n_routed_experts"


class DiepDeepseekV3Config(DiepConfigMixin, DeepseekV3Config):
    model_type = "diep_deepseek_v3"
    diep_num_experts_field = "n_routed_experts"


class DiepGptOssConfig(DiepConfigMixin, GptOssConfig):
    model_type = "diep_gpt_oss"
    diep_num_experts_field = "num_local_experts"


class DiepPhimoeConfig(DiepConfigMixin, PhimoeConfig):
    model_type = "diep_phimoe"
    diep_num_experts_field = "num_local_experts"


class DiepGraniteMoeConfig(DiepConfigMixin, GraniteMoeConfig):
    model_type = "diep_granitemoe"
    diep_num_experts_field = "num_local_experts"


DIEP_CONFIG_CLASSES = {
    cls.model_type: cls
    for cls in (
        DiepMixtralConfig,
        DiepQwen2MoeConfig,
        DiepQwen3MoeConfig,
        DiepOlmoeConfig,
        DiepDeepseekV2Config,
        DiepDeepseekV3Config,
        DiepGptOssConfig,
        DiepPhimoeConfig,
        DiepGraniteMoeConfig,
    )
}

for _config_class in DIEP_CONFIG_CLASSES.values():
    _config_class.register_for_auto_class()
