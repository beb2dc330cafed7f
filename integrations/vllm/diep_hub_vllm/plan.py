# Copyright 2026 the diep_hub authors. Apache-2.0.
"""What a ``diep_<family>`` config.json asks of the serving engine, read and checked without importing vLLM.

A pruned checkpoint keeps a different number of routed experts in each MoE layer (``num_experts_per_layer``, null
for dense layers), routes each layer with top-k = min(num_experts_per_tok, kept), and may carry the calibrated
expert-skipping tables (``diep_skipping``). The format is described in diep_hub's docs/checkpoint-format.md; this
module reads it the way the checkpoint's own remote code does, so vLLM builds the same model transformers builds.
"""

from __future__ import annotations

from dataclasses import dataclass


class DiepServingError(ValueError):
    """A diep checkpoint that the plugin cannot serve as it is (unsupported family, inconsistent config/weights)."""


@dataclass(frozen=True)
class Family:
    """How one family's checkpoint and vLLM model name things."""

    model_type: str  # the diep model_type in config.json
    architecture: str  # the class name in config.json's "architectures"
    count_field: str  # the family config field holding the (widest) expert count
    ffn_field: str  # the config field holding one routed expert's FFN width
    block_attr: str  # the decoder layer's attribute (and checkpoint key part) holding the MoE block
    leaves: tuple[str, str, str]  # per-expert checkpoint names of (gate, down, up)
    # DeepSeek's group-limited routing: None, or the scoring the checkpoint's remote code always uses ("softmax"
    # for V2, which groups only with topk_method "group_limited_greedy"; "sigmoid" with a selection bias for V3)
    grouped_scoring: str | None = None
    min_per_group: int = 1  # experts a routing group needs (V3 scores a group by the sum of its top 2)


SUPPORTED: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("diep_mixtral", "DiepMixtralForCausalLM", "num_local_experts", "intermediate_size",
               "block_sparse_moe", ("w1", "w2", "w3")),
        Family("diep_qwen2_moe", "DiepQwen2MoeForCausalLM", "num_experts", "moe_intermediate_size", "mlp",
               ("gate_proj", "down_proj", "up_proj")),
        Family("diep_qwen3_moe", "DiepQwen3MoeForCausalLM", "num_experts", "moe_intermediate_size", "mlp",
               ("gate_proj", "down_proj", "up_proj")),
        Family("diep_olmoe", "DiepOlmoeForCausalLM", "num_experts", "intermediate_size", "mlp",
               ("gate_proj", "down_proj", "up_proj")),
        Family("diep_deepseek_v2", "DiepDeepseekV2ForCausalLM", "n_routed_experts", "moe_intermediate_size", "mlp",
               ("gate_proj", "down_proj", "up_proj"), grouped_scoring="softmax"),
        Family("diep_deepseek_v3", "DiepDeepseekV3ForCausalLM", "n_routed_experts", "moe_intermediate_size", "mlp",
               ("gate_proj", "down_proj", "up_proj"), grouped_scoring="sigmoid", min_per_group=2),
    )
}

# Families diep_hub can prune but this plugin refuses, with the reason given at load.
REFUSED: dict[str, tuple[str, str]] = {
    "diep_gpt_oss": ("DiepGptOssForCausalLM", "the plugin has no per-layer GPT-OSS model"),
    "diep_phimoe": ("DiepPhimoeForCausalLM", "the plugin has no per-layer PhiMoE model"),
    "diep_granitemoe": ("DiepGraniteMoeForCausalLM", "the plugin has no per-layer GraniteMoE model"),
}


def supported_list() -> str:
    return ", ".join(f"{f.model_type} ({f.architecture})" for f in SUPPORTED.values())


def refusal_message(model_type: str, source: str = "") -> str:
    """Why a diep checkpoint of ``model_type`` is refused, and what is supported instead."""
    where = f" {source}" if source else ""
    _, reason = REFUSED.get(model_type, ("", "the plugin does not know this family"))
    return (
        f"diep-hub-vllm cannot serve the {model_type} checkpoint{where}: {reason}. Supported families: "
        f"{supported_list()}"
    )


@dataclass(frozen=True)
class LayerSkipping:
    """One layer's skip rule: slot e is skipped when w_e < gamma1 * cka_ratio[e0][e] * w_e0 (e0 = primary)."""

    gamma1: float
    cka_ratio: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class LayerPlan:
    index: int
    num_experts: int
    top_k: int
    skipping: LayerSkipping | None
    n_group: int = 1  # grouped routing (DeepSeek): n_group contiguous groups, topk_group of them per token
    topk_group: int = 1


@dataclass(frozen=True)
class ServingPlan:
    family: Family
    layers: dict[int, LayerPlan]  # MoE layers only, by decoder-layer index
    dense_layers: tuple[int, ...]
    skipping_enabled: bool
    skipping_reason: str  # why skipping is on or off, for the log

    @property
    def widest(self) -> int:
        return max(p.num_experts for p in self.layers.values())


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_plan(config, source: str = "") -> ServingPlan:
    """Per-layer counts, top-k and skipping of a diep config, refusing anything the plugin would serve wrongly."""
    model_type = getattr(config, "model_type", "")
    family = SUPPORTED.get(model_type)
    if family is None:
        raise DiepServingError(refusal_message(model_type, source))
    num_layers = config.num_hidden_layers
    counts = getattr(config, "num_experts_per_layer", None)
    if not isinstance(counts, (list, tuple)) or len(counts) != num_layers:
        raise DiepServingError(
            f"config.json of{(' ' + source) if source else ''} {model_type}: num_experts_per_layer is {counts!r}; "
            f"it must be a list with one entry per decoder layer ({num_layers}), null for dense layers"
        )
    top_k = config.num_experts_per_tok
    tables, enabled, reason = _read_skipping(config, counts)
    layers, dense = {}, []
    for index, count in enumerate(counts):
        if count is None:
            dense.append(index)
            continue
        if not _is_int(count) or count < 1:
            raise DiepServingError(
                f"config num_experts_per_layer[{index}] = {count!r}; a MoE layer keeps an integer >= 1 experts"
            )
        layer_top_k = min(top_k, count)
        n_group, topk_group = _layer_groups(config, family, index, count, layer_top_k, source)
        layers[index] = LayerPlan(index, count, layer_top_k, tables.get(index) if enabled else None, n_group,
                                  topk_group)
    if not layers:
        raise DiepServingError(f"config num_experts_per_layer = {counts!r} has no MoE layer")
    return ServingPlan(family, layers, tuple(dense), enabled, reason)


def _group_field(config, field: str, index: int) -> tuple[str, object]:
    """(name, value) of a layer's group count: its ``<field>_per_layer`` entry, else the config-wide ``field``."""
    per_layer = getattr(config, f"{field}_per_layer", None)
    entry = per_layer[index] if isinstance(per_layer, (list, tuple)) and index < len(per_layer) else None
    if entry is not None:
        return f"{field}_per_layer[{index}]", entry
    return field, getattr(config, field, None)


def _layer_groups(config, family: Family, index: int, count: int, top_k: int, source: str) -> tuple[int, int]:
    """(n_group, topk_group) one DeepSeek layer routes with, as the checkpoint's remote code builds it (the layer's
    n_group_per_layer / topk_group_per_layer entry, else the config's n_group / topk_group), refusing groups that
    the kept count cannot fill: grouped routing views a layer's experts as n_group equal contiguous groups."""
    if family.grouped_scoring is None:
        return 1, 1
    if family.grouped_scoring == "softmax" and getattr(config, "topk_method", None) != "group_limited_greedy":
        return 1, 1  # DeepSeek-V2 routes greedily over all experts unless topk_method says group_limited_greedy
    (group_name, n_group), (topk_name, topk_group) = (_group_field(config, f, index) for f in ("n_group", "topk_group"))
    where = f"config.json of{(' ' + source) if source else ''} {family.model_type}"
    regroup = (
        f"; prune with the same count from every group, or regroup the layer (DiEPPruner(regroup=[{index}]) / "
        f"prune_experts(..., regroup=[{index}]): n_group = topk_group = 1)"
    )
    if not _is_int(n_group) or n_group < 1 or not _is_int(topk_group) or not 1 <= topk_group <= n_group:
        raise DiepServingError(
            f"{where}: layer {index} routes with {group_name} = {n_group!r} and {topk_name} = {topk_group!r}; "
            "grouped routing needs integers with 1 <= topk_group <= n_group"
        )
    per_group = count // n_group
    if count % n_group or per_group < family.min_per_group:
        raise DiepServingError(
            f"{where}: layer {index} keeps {count} experts but {group_name} = {n_group}: grouped routing splits a "
            f"layer's experts into n_group equal contiguous groups of at least {family.min_per_group}, so the kept "
            f"count must be a multiple of {n_group} that is >= {n_group * family.min_per_group}" + regroup
        )
    if topk_group * per_group < top_k:
        raise DiepServingError(
            f"{where}: layer {index} keeps {count} experts in {n_group} groups of {per_group}, and {topk_name} = "
            f"{topk_group} group(s) cannot supply top-k = {top_k} experts; topk_group x experts per group must be "
            f">= top-k" + regroup
        )
    return n_group, topk_group


def _read_skipping(config, counts) -> tuple[dict[int, LayerSkipping], bool, str]:
    """The skipping tables and whether they apply, with transformers' switch semantics.

    ``diep_skipping["enabled"]`` decides, unless ``diep_skipping_enabled`` is set (in vLLM:
    ``hf_overrides={"diep_skipping_enabled": False}``, as ``from_pretrained(..., diep_skipping_enabled=False)``).
    """
    settings = getattr(config, "diep_skipping", None)
    override = getattr(config, "diep_skipping_enabled", None)
    if not settings:
        if override:
            raise DiepServingError(
                "diep_skipping_enabled=True was asked for but config.json has no diep_skipping tables; calibrate "
                "skipping when pruning (DiEPPruner(skipping=True) or skipping.enabled in the recipe)"
            )
        return {}, False, "config.json has no diep_skipping tables"
    if override is not None:
        enabled, reason = bool(override), f"diep_skipping_enabled={bool(override)} override"
    else:
        enabled, reason = bool(settings.get("enabled")), f"config.json diep_skipping.enabled={settings.get('enabled')}"
    tables = {}
    for key, entry in (settings.get("layers") or {}).items():
        index = int(key)
        count = counts[index] if 0 <= index < len(counts) else None
        if count is None:
            raise DiepServingError(
                f"config diep_skipping.layers has layer {key}, which is not a MoE layer of this checkpoint"
            )
        table = entry["cka_ratio"]
        if len(table) != count or any(len(row) != count for row in table):
            raise DiepServingError(
                f"diep_skipping layer {index} has a {len(table)}-row table but the layer keeps {count} experts; "
                "recalibrate skipping after pruning"
            )
        tables[index] = LayerSkipping(float(entry["gamma1"]), tuple(tuple(float(v) for v in row) for row in table))
    return tables, enabled, reason
