"""The dry run: what a recipe would cost, from the model's config alone, and whether its sparsity is reachable.

Kept apart from the run because it must never load weights: the model is built on the meta device, so even the
largest MoE is estimated in seconds, and a sparsity the real run would refuse is refused here with the same message.
It reads the run's own :class:`~diep_hub.pipeline.plan.RunPlan` (the prune stage's settings, the load stage's
model), after the runner's checks (config, family, preflight) have passed.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import DiEPError, UnsupportedModelError
from .families import get_family
from .model_loading import load_config
from .pipeline.plan import RunPlan

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Effective throughput used for the search-time estimate of a dry run: a stated assumption, not a measurement.
_ASSUMED_FLOPS = {"cuda": 200e12, "cpu": 0.3e12}


def estimate(plan: RunPlan, config=None) -> dict[str, Any]:
    """Parameter counts, weight bytes and a search-time estimate from the config alone (no weights loaded).

    The model is instantiated under accelerate's ``init_empty_weights`` (meta tensors), so even Mixtral-8x22B
    costs nothing; the family adapter finds the experts exactly as the real run will, and the real selection
    (``select_experts``, group rules included) runs on placeholder scores with the run's floors and caps, so a
    sparsity the real run would refuse is refused here. ``config``: the model's config when already read.

    Raises:
        ConfigError: the sparsity cannot be reached (the message is the one ``prune`` gives).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    load, p = plan.load, plan.prune.pruner_kwargs
    config = config if config is not None else load_config(load)
    family = get_family(config, source=load.source)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=load.trust_remote_code)
    layers = family.moe_layers(model)
    selection = _feasible_selection(plan, model, family, layers)
    total = sum(p.numel() for p in model.parameters())
    hidden = int(config.hidden_size)
    per_layer = []
    for layer in layers:
        expert_params = sum(p.numel() for p in layer.experts.parameters())
        per_layer.append(
            {
                "layer": layer.index,
                "num_experts": layer.num_experts,
                "top_k": layer.top_k,
                "params_per_expert": expert_params // layer.num_experts,
                # Router rows go with their experts.
                "router_params_per_expert": layer.router.weight.shape[1],
            }
        )
    num_experts = sum(x["num_experts"] for x in per_layer)
    expert_params = sum(x["num_experts"] * x["params_per_expert"] for x in per_layer)
    to_remove = selection.num_removed
    mean_expert = sum(x["num_experts"] * (x["params_per_expert"] + x["router_params_per_expert"]) for x in per_layer)
    mean_expert = mean_expert / max(num_experts, 1)
    removed_params = round(to_remove * mean_expert)
    after = total - removed_params

    dtype = load.dtype
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        dtype = dtype.removeprefix("torch.")
    bytes_per = _DTYPE_BYTES.get(dtype, 2)

    # Search cost: one reference pass, then epochs x (forward + backward ~ 3 forwards) over the calibration tokens.
    seq_len = p["seq_len"]
    tokens = p["num_samples"] * seq_len
    inactive = sum((x["num_experts"] - x["top_k"]) * x["params_per_expert"] for x in per_layer)
    active = total - inactive
    search_active = total if p["search_mode"] == "dense" else active
    passes = 1 + (3 * p["epochs"] if p["method"] == "diep" else 0)
    flops = 2 * search_active * tokens * passes
    device = "cuda" if load.device_map not in (None, "cpu") else "cpu"
    seconds = flops / _ASSUMED_FLOPS[device]
    activations = p["batch_size"] * seq_len * hidden * int(config.num_hidden_layers) * 2 * 4
    result = {
        "model": load.model_id,
        "family": family.model_type,
        "dtype": dtype,
        "num_moe_layers": len(per_layer),
        "experts_per_layer": sorted({x["num_experts"] for x in per_layer}),
        "top_k": sorted({x["top_k"] for x in per_layer}),
        "params_total": total,
        "params_experts": expert_params,
        "params_active_per_token": active,
        "experts_total": num_experts,
        "experts_removed": to_remove,
        "experts_kept": num_experts - to_remove,
        "params_after_pruning": after,
        "weight_bytes": total * bytes_per,
        "weight_bytes_after_pruning": after * bytes_per,
        "search_flops": flops,
        "search_seconds_estimate": seconds,
        "search_peak_bytes_estimate": int(total * bytes_per * 1.2 + activations),
        "assumptions": (
            f"{_ASSUMED_FLOPS[device] / 1e12:.1f} TFLOP/s effective on {device}; search = 1 reference pass + "
            f"{p['epochs']} epochs x 3 passes over {tokens} tokens "
            f"({'all experts' if p['search_mode'] == 'dense' else 'top-k experts'} active); removal "
            "assumes the mean expert size; peak = 1.2 x weights + one batch of activations"
        ),
    }
    return result


def _feasible_selection(plan: RunPlan, model, family, layers):
    """The selection ``DiEPPruner.check_feasible`` makes before a real run (placeholder scores, the prune stage's
    floors and caps), with its error message; the dry run's model is on the meta device, which check_feasible
    itself refuses, so the same call is made here."""
    from .selection import select_experts

    p = plan.prune.pruner_kwargs
    if not layers:
        raise UnsupportedModelError(f"{plan.load.source} ({family.model_type}) has no MoE layers to prune")
    placeholder = {layer.index: torch.linspace(1.0, 2.0, layer.num_experts) for layer in layers}
    try:
        return select_experts(
            placeholder, model, sparsity=p["sparsity"], mode=p["selection"],
            max_layer_sparsity=p["max_layer_sparsity"], min_experts_per_layer=p["min_experts_per_layer"],
            regroup=p["regroup"],
        )
    except DiEPError as exc:
        from .selection_limits import unreachable_sparsity

        raise unreachable_sparsity(p["sparsity"], family, layers, exc) from exc
