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


class DiepCheckpointError(ValueError):
    """A diep_<family> checkpoint is incomplete or corrupt: its config contradicts itself or its weights.

    Defined here, not imported, because this file travels with every checkpoint and may import only transformers.
    ``import diep_hub`` makes the registered classes raise a subclass that is also a ``diep_hub`` error.
    """


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kept_ids_problems(ids, count: int, original) -> list[str]:
    """What is wrong with one layer's kept ids (empty when they are fine)."""
    if not isinstance(ids, (list, tuple)):
        return [f"a {type(ids).__name__}, not a list"]
    problems = []
    if len(ids) != count:
        problems.append(f"{len(ids)} ids for {count} experts")
    not_ints = [i for i in ids if not _is_int(i)]
    if not_ints:
        problems.append(f"not integers: {not_ints}")
    ints = [i for i in ids if _is_int(i)]
    repeated = sorted({i for i in ints if ints.count(i) > 1})
    if repeated:
        problems.append(f"repeated: {repeated}")
    outside = [i for i in ints if i < 0 or (original is not None and i >= original)]
    if outside:
        problems.append(f"out of range: {outside}")
    return problems


class DiepConfigMixin:
    """Adds per-layer expert counts to a family config and checks them."""

    # name of the family config field holding the expert count; set by each subclass
    diep_num_experts_field: str = ""
    # load-time override of diep_skipping["enabled"]; a plain class attribute (not a saved field) so that
    # from_pretrained(..., diep_skipping_enabled=False) finds it and sets it on the instance
    diep_skipping_enabled = None
    # the error raised for an inconsistent config (diep_hub swaps in a subclass that is also a DiEPError)
    _diep_error = DiepCheckpointError

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.diep_validate_per_layer()

    def diep_validate_per_layer(self) -> None:
        """Check the per-layer fields against each other, so a damaged config.json fails at load, not in forward.

        ``num_experts_per_layer``, ``original_num_experts`` and ``kept_expert_ids`` hold one entry per decoder layer;
        a MoE layer keeping ``n`` experts lists ``n`` unique original ids, each in ``[0, original)``.
        """
        error = self._diep_error
        counts = getattr(self, "num_experts_per_layer", None)
        if counts is None:
            return
        num_layers = self.num_hidden_layers
        for name in ("num_experts_per_layer", "original_num_experts", "kept_expert_ids"):
            value = getattr(self, name, None)
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != num_layers):
                size = f"{len(value)} entries" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
                raise error(
                    f"config {name} has {size} but the model has {num_layers} layers; it must be a list with one "
                    "entry per decoder layer (null for dense layers)"
                )
        originals = getattr(self, "original_num_experts", None)
        kept = getattr(self, "kept_expert_ids", None)
        for layer, count in enumerate(counts):
            if count is not None and (not _is_int(count) or count < 1):
                raise error(
                    f"config num_experts_per_layer[{layer}] = {count!r}; every MoE layer keeps an integer >= 1 "
                    "experts (null for a dense layer)"
                )
            original = originals[layer] if originals is not None else None
            if originals is not None and (original is None) != (count is None):
                raise error(
                    f"config layer {layer}: num_experts_per_layer is {count!r} but original_num_experts is "
                    f"{original!r}; both are null (dense layer) or both are integers"
                )
            if original is not None and (not _is_int(original) or original < count):
                raise error(
                    f"config original_num_experts[{layer}] = {original!r} is smaller than the {count} experts the "
                    "layer keeps; it must be an integer >= num_experts_per_layer"
                )
            ids = kept[layer] if kept is not None else None
            if ids is None:  # dense layer, or a MoE layer whose ids were not recorded (read as 0..count-1)
                continue
            if count is None:
                raise error(
                    f"config kept_expert_ids[{layer}] = {ids!r} but layer {layer} is dense (num_experts_per_layer "
                    "is null); a dense layer lists no ids (null)"
                )
            problems = _kept_ids_problems(ids, count, original)
            if problems:
                of = f" of {original}" if original is not None else ""
                allowed = f"in [0, {original})" if original is not None else "a non-negative integer"
                raise error(
                    f"config kept_expert_ids[{layer}] = {ids!r} is invalid ({'; '.join(problems)}): layer {layer} "
                    f"keeps {count} experts{of}, so it must list {count} unique ids, each {allowed}"
                )

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
