"""The dry run: whether a recipe can run, and what it would cost, from the model's config alone (no weights).

No weight is loaded or allocated, so even the largest MoE is estimated in seconds. Three things are told:

1. **Feasibility, as ``prune`` decides it.** The pruner is built from the run's own settings (the same validation)
   and :func:`check_feasible` calls ``DiEPPruner.prepare_scoring``, as ``DiEPPruner.prune_model`` does before
   calibration: ``DiEPPruner.check_feasible`` (the real selection with floors, caps and group rules, on placeholder
   scores) and the criterion's ``check_feasible`` (NAEE's subset count and surgery plan). The model is built with
   FakeTensors (shapes and devices, no memory), so those checks run unchanged. A request ``prune`` refuses is
   refused here with its message, and the command exits non-zero.
2. **Cost, from a stated model** (:mod:`diep_hub.cost_model`: :func:`cost_model`, constants :data:`DEVICE_COSTS`
   measured on real runs; how close it came is in docs/dry-run.md)::

       seconds = T0 [+ Tb] + Te x evaluations + 2 x (N_search x tokens_cal x passes
                                             + N_active x (tokens_eval x evaluations + tokens_skip)
                                             + N_active x tokens_cal x edit passes + N_experts x merging tokens) / R
       peak    = M0 + k x weight_bytes + max(search activations, evaluation logits) + 4 x 4 B x search parameters
                 + criterion caches + teacher states

   ``N_active`` is the parameters a token passes through (top-k experts), ``N_search`` the same in the search
   (every expert in dense mode); ``passes`` is 1 reference pass plus 3 a search step (forward and backward) x
   epochs for the searching criteria, 1 for the others; ``edit passes``, ``merging tokens`` and the teacher
   states are what merging and router recalibration add (:func:`_edit_costs`); ``R`` the effective FLOP/s of the
   device kind, ``T0`` the fixed time (imports, lm-eval set-up, card, save), ``Tb`` the training of
   diep-hub/tiny-mixtral at load time (that model only), ``Te`` one evaluation's lm-eval overhead; ``M0`` the
   process's resident memory with torch, transformers and lm-eval loaded, ``k`` the copies of the weights alive at
   the peak.
3. **The config it read**: a Hub id while the Hub cannot be reached fails at once (:mod:`diep_hub.preflight`), or
   uses the copy of the config shipped beside the recipes (``recipes/configs/<org>--<name>.json``, with its source
   in ``<org>--<name>.source.json``) and says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from .cost_model import (
    CALIBRATION,
    DEVICE_COSTS,
    MEMORY_TOLERANCE,
    TIME_TOLERANCE,
    CostInputs,
    cost_model,
    describe_cost_model,
)
from .errors import ConfigError
from .families import get_family
from .pipeline.plan import RunPlan
from .tiny import TINY_MODEL_ID, tiny_cache_file

logger = logging.getLogger(__name__)

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: criteria that search with gradients: 1 reference pass, then forward + backward (~3 forward passes) a step
_SEARCHING = {"diep": "epochs", "diep_removal": "epochs"}


# ------------------------------------------------------------------------------------------- shipped configs
def shipped_configs_folder() -> Path:
    """``recipes/configs`` (``diep_hub.recipes`` in a wheel): verified copies of real models' config.json."""
    return Path(str(resources.files("diep_hub.recipes"))) / "configs"


def shipped_config_path(model_id: str) -> Path | None:
    """The shipped copy of ``model_id``'s config.json (``<org>--<name>.json``), when there is one with its source."""
    folder = shipped_configs_folder()
    name = model_id.replace("/", "--")
    path, source = folder / f"{name}.json", folder / f"{name}.source.json"
    return path if path.is_file() and source.is_file() else None


def _shipped_config(model_id: str, path: Path):
    """The config from a shipped copy, and a description naming the file and where the copy was taken from."""
    from transformers import AutoConfig

    from .files import read_json_object

    data = read_json_object(path, "shipped model config")
    source = read_json_object(path.with_name(path.name.removesuffix(".json") + ".source.json"), "config source")
    if "model_type" not in data:
        raise ConfigError(f"{path}: no model_type -> a shipped config must be a verbatim config.json")
    missing = [k for k in ("repo", "path", "commit") if not source.get(k)]
    if missing:
        raise ConfigError(f"{path}: its source record lacks {missing} -> a shipped config names the stored copy it "
                          "was taken from (repo, path, commit)")
    config = AutoConfig.for_model(**data)
    where = ", ".join(f"{k} {source[k]}" for k in ("repo", "path", "commit"))
    return config, f"shipped copy {path} (of {model_id}; taken from {where})"


def dry_run_config(plan: RunPlan):
    """The model's config for a dry run, and where it came from.

    A built-in or local model is read as the run reads it. A Hub id is read from the Hub (or its cache) when that
    works without the network or the Hub answers; otherwise from the shipped copy, when there is one; otherwise the
    offline error of :func:`diep_hub.preflight.check_model_reachable` is raised at once (no retries).
    """
    from . import model_loading
    from .preflight import check_model_reachable

    load = plan.load
    if load.offline:
        return model_loading.load_config(load), f"built offline by diep_hub ({load.model_id})"
    if model_loading._local_model_folder(load.model_id) is not None:
        return model_loading.load_config(load), f"folder {load.model_id}"
    shipped = shipped_config_path(load.model_id)
    try:
        check_model_reachable(load)
    except ConfigError as exc:
        if shipped is None:
            raise ConfigError(f"{exc}; no verified copy of this model's config ships with diep_hub "
                              f"({shipped_configs_folder()}), so the dry run needs the Hub too") from None
        config, described = _shipped_config(load.model_id, shipped)
        logger.warning("the Hub cannot be reached (%s); the dry run uses the %s", exc, described)
        return config, described
    return model_loading.load_config(load), f"Hub repo {load.model_id} (revision {load.revision or 'main'})"


def dry_run_summary(recipe, plan: RunPlan) -> dict[str, Any]:
    """What ``diep-hub run --dry-run`` returns: the config (no weights), family and preflight checks as the run
    makes them, then :func:`estimate`. Raises what ``prune`` would raise for an infeasible request."""
    from .preflight import check_dry_run_inputs

    config, source = dry_run_config(plan)
    get_family(config, source=plan.load.source)
    notes = check_dry_run_inputs(recipe, model_config=config)
    result = estimate(plan, config)
    result["config_source"] = source
    result["notes"] = notes
    return {"dry_run": True, "output_dir": str(plan.save.out), "push": plan.push.enabled,
            "recipe": recipe.to_dict(), "estimate": result}


# ---------------------------------------------------------------------------------------------- feasibility
def dry_run_pruner(plan: RunPlan):
    """The run's pruner without resolving its data (a dry run writes nothing): same settings, same validation."""
    from .pruner import DiEPPruner

    return DiEPPruner(**{**plan.prune.pruner_kwargs, "dataset": plan.prune.calibration.named, "progress": False})


def shape_only_model(config, trust_remote_code: bool = False):
    """The model with every tensor a FakeTensor on the CPU: real shapes and devices, no memory, no values.

    Built on the meta device first (accelerate's ``init_empty_weights``), then given fake CPU storage, so that the
    checks ``prune`` makes (which refuse meta tensors: offloaded weights cannot be sliced) run on it unchanged.
    """
    from accelerate import init_empty_weights
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
    return model


def check_feasible(pruner, model):
    """The checks ``prune`` makes before calibration: ``DiEPPruner.prepare_scoring``, which ``prune_model`` calls
    (the real selection on placeholder scores, worded by ``unreachable_sparsity``, then the criterion's
    ``check_feasible`` with the counts the real run gives it). Returns the placeholder selection."""
    return pruner.prepare_scoring(model)[0]


# ------------------------------------------------------------------------------------------------- estimate
def _device_kind(plan: RunPlan) -> str:
    return "cuda" if plan.load.device_map not in (None, "cpu") else "cpu"


def _search_passes(pruner, num_moe_layers: int = 1, experts_per_layer: int = 2) -> int:
    """1 reference pass, plus 3 a step (forward + backward) x epochs for a searching criterion; for validated_choice,
    each candidate's passes over the fit share (one for all the routing-statistic candidates together) plus one
    pass a judged keep map (a candidate's, and its uniform one with ``compare_uniform`` under global selection: an
    upper bound) and one unpruned over the held-out share, plus, for each keep map it refines, at most
    (probes a layer x layers + 5) passes a round over its refine sequences and 2 held-out ones; a layer's probes are
    2 x ``probe_width``, at most its ``experts_per_layer`` (all of them with ``probe_width=0``); the refinements
    together measure at most ``refine_budget`` calibration passes' worth, plus one unpruned pass over the refine
    sequences; with ``refine_objective="nll"`` each keep map it refines is measured once more over the held-out
    share."""
    if pruner.method == "validated_choice":
        from .criteria.base import get_criterion

        settings = pruner.criterion_settings()
        held_out = settings.validation_fraction
        # each candidate runs with its own default options; the routing-statistic ones share one pass
        from .criteria.capture import RoutingStatisticCriterion

        sharing = [n for n in settings.candidates if issubclass(get_criterion(n), RoutingStatisticCriterion)]
        fit = (1 if sharing else 0) + sum(_passes(name, lambda n=name: get_criterion(n).options().epochs)
                                          for name in settings.candidates if name not in sharing)
        judged = len(settings.candidates) * (2 if settings.compare_uniform and pruner.selection == "global" else 1)
        passes = fit * (1 - held_out) + (judged + 1) * held_out
        if settings.refine_rounds:
            # a round: the map and each layer's probes, then the map and at most 3 shortlisted moves; 2 passes first;
            # as many refinements as refine_candidates, at most one a judged keep map
            share = min(settings.refine_sequences, pruner.num_samples) / pruner.num_samples
            refined = min(settings.refine_candidates, judged)
            probes = min(2 * settings.probe_width, experts_per_layer) if settings.probe_width else experts_per_layer
            refining = refined * share * (2 + settings.refine_rounds * (probes * num_moe_layers + 5))
            if settings.refine_budget:  # the budget bounds the refinements' measurements; the reference pass is extra
                refining = min(refining, settings.refine_budget + share)
            passes += refining + refined * 2 * held_out
            if settings.refine_objective != "kl":  # the maps refined are measured again on it, the winner first
                passes += refined * held_out
        return math.ceil(passes)
    return _passes(pruner.method, lambda: pruner.epochs if pruner.method == "diep"
                   else pruner.criterion_settings().epochs)


def _cache_bytes(pruner, text_config, num_decoder_layers: int, weight_bytes_per: int) -> int:
    """The most validated_choice keeps in its MaskedKL caches (criteria/masked_kl.py): its judging budget
    (``choice.cache_budgets``) for the unpruned log-probabilities of the held-out sequences (float32), its refining
    budget for those of the refine sequences and their decoder-layer outputs, each capped by what it could hold."""
    if pruner.method != "validated_choice":
        return 0
    from .criteria.choice import cache_budgets

    settings = pruner.criterion_settings()
    judging_budget, refining_budget = cache_budgets(settings.cache_mb)
    held_out = math.ceil(settings.validation_fraction * pruner.num_samples)
    refine = min(settings.refine_sequences, pruner.num_samples - held_out) if settings.refine_rounds else 0
    logprobs = pruner.seq_len * int(text_config.vocab_size) * 4
    outputs = pruner.seq_len * int(text_config.hidden_size) * weight_bytes_per * max(0, num_decoder_layers - 1)
    judging = min(judging_budget, held_out * logprobs)
    refining = min(refining_budget, refine * (logprobs + outputs))
    return judging + refining


def _edit_costs(pruner, hidden_size: int, weight_bytes_per: int, layers, removed: dict[int, int]
                ) -> dict[str, int | float]:
    """What merging and router recalibration add (the pruner's ``merge`` and ``recalibrate_router``): merging runs
    one pass over the calibration tokens (frequencies and each layer's inputs) and every expert of a layer on
    ``max_tokens`` of them; recalibration one unpruned pass (the teacher's hidden states, kept in the model's
    dtype), the pruned model's loss before and after, and ``steps`` forward + backward passes (~3 forward passes)
    over ``batch_size`` sequences each. Merging also aligns each removed expert's neurons (:func:`_alignment`);
    ``removed``: experts each layer gives up."""
    from .merging import MAX_TOKENS

    passes, merge_tokens, teacher_bytes = 0.0, 0, 0
    alignment = {"aligned_merges": 0, "align_width": 0, "align_features": 0}
    if pruner.merge != "none":
        passes += 1
        merge_tokens = min(MAX_TOKENS, pruner.num_samples * pruner.seq_len)
        if pruner.merge_alignment == "weights":
            alignment = _alignment(layers, removed)
    if pruner.recalibrate_router:
        passes += 3 + 3 * pruner.recalibration_steps * min(pruner.batch_size, pruner.num_samples) / pruner.num_samples
        teacher_bytes = pruner.num_samples * pruner.seq_len * hidden_size * weight_bytes_per
    return {"edit_passes": passes, "merge_tokens": merge_tokens, "teacher_bytes": teacher_bytes, **alignment}


def _alignment(layers, removed: dict[int, int]) -> dict[str, int]:
    """Merging aligns every removed expert of a layer stored in the gated layout (``supports_alignment``) to its
    kept partner: one alignment each, at the widest such layer's width."""
    from .merge_alignment import alignment_shape, supports_alignment

    aligned = [layer for layer in layers if supports_alignment(layer)]
    if not aligned:
        return {"aligned_merges": 0, "align_width": 0, "align_features": 0}
    shapes = [alignment_shape(layer) for layer in aligned]
    return {
        "aligned_merges": sum(removed.get(layer.index, 0) for layer in aligned),
        "align_width": max(width for width, _ in shapes),
        "align_features": max(features for _, features in shapes),
    }


def _passes(method: str, epochs) -> int:
    """1 for a one-pass criterion; 1 + 3 x ``epochs()`` for a searching one (read only then)."""
    return 1 + 3 * int(epochs()) if method in _SEARCHING else 1


def estimate(plan: RunPlan, config=None) -> dict[str, Any]:
    """Parameter counts, weights, feasibility, time and peak memory of the run, from the config alone.

    ``config``: the model's config when already read (else :func:`dry_run_config`).

    Raises:
        ConfigError: the request cannot be served (the message is the one ``prune`` gives).
    """
    load = plan.load
    if config is None:
        config, _ = dry_run_config(plan)
    family = get_family(config, source=load.source)
    pruner = dry_run_pruner(plan)
    model = shape_only_model(config, load.trust_remote_code)
    layers = family.moe_layers(model)
    selection = check_feasible(pruner, model)
    total = sum(p.numel() for p in model.parameters())
    text = config.get_text_config()
    per_layer = []
    for layer in layers:
        expert_params = sum(p.numel() for p in layer.experts.parameters())
        per_layer.append({
            "layer": layer.index, "num_experts": layer.num_experts, "top_k": layer.top_k,
            "params_per_expert": expert_params // layer.num_experts,
            "router_params_per_expert": layer.router.weight.shape[1],  # router rows go with their experts
        })
    num_experts = sum(x["num_experts"] for x in per_layer)
    expert_params = sum(x["num_experts"] * x["params_per_expert"] for x in per_layer)
    to_remove = selection.num_removed
    mean_expert = sum(x["num_experts"] * (x["params_per_expert"] + x["router_params_per_expert"]) for x in per_layer)
    after = total - round(to_remove * mean_expert / max(num_experts, 1))

    dtype = load.dtype
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        dtype = dtype.removeprefix("torch.")
    bytes_per = _DTYPE_BYTES.get(dtype, 2)

    p = plan.prune.pruner_kwargs
    inactive = sum((x["num_experts"] - x["top_k"]) * x["params_per_expert"] for x in per_layer)
    active = total - inactive
    dense = pruner.method == "diep" and pruner.search_mode == "dense"
    ev = plan.evaluation
    evaluations = (int(ev.base) + 1) if ev.enabled else 0
    width = max((x["params_per_expert"] // (3 * int(text.hidden_size))) for x in per_layer)
    k_eff = max(x["num_experts"] if dense else x["top_k"] for x in per_layer)
    inputs = CostInputs(
        params_total=total, params_active=active, params_search=total if dense else active,
        bytes_per_param=bytes_per, search_tokens=p["num_samples"] * p["seq_len"],
        search_passes=_search_passes(pruner, len(layers), max(x["num_experts"] for x in per_layer)),
        eval_tokens=(ev.perplexity_samples * ev.perplexity_seq_len) if ev.enabled and ev.perplexity else 0,
        evaluations=evaluations,
        skipping_tokens=(plan.skipping.num_samples * plan.skipping.seq_len) if plan.skipping.enabled else 0,
        batch_size=p["batch_size"], seq_len=p["seq_len"], num_layers=int(text.num_hidden_layers),
        hidden_size=int(text.hidden_size), expert_width=k_eff * width, vocab_size=int(text.vocab_size),
        eval_batch_size=ev.batch_size if ev.enabled else 0, eval_seq_len=ev.perplexity_seq_len if ev.enabled else 0,
        search_parameters=2 * num_experts if pruner.method in _SEARCHING else 0,
        builds_model=load.model_id == TINY_MODEL_ID and not tiny_cache_file().is_file(),  # trained once, then read
        cache_bytes=_cache_bytes(pruner, text, int(text.num_hidden_layers), bytes_per),
        params_experts=expert_params,
        **_edit_costs(pruner, int(text.hidden_size), bytes_per, layers,
                      {layer.index: layer.num_experts - selection.per_layer_kept[layer.index] for layer in layers}),
    )
    costs = DEVICE_COSTS[_device_kind(plan)]
    cost = cost_model(inputs, costs)
    return {
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
        "kept_per_layer": {str(k): v for k, v in selection.per_layer_kept.items()},
        "params_after_pruning": after,
        "weight_bytes": total * bytes_per,
        "weight_bytes_after_pruning": after * bytes_per,
        "device": costs.kind,
        "search_flops": 2 * inputs.params_search * inputs.search_tokens * inputs.search_passes,
        "search_seconds_estimate": cost["search_seconds"],
        "edit_seconds_estimate": cost["edit_seconds"],
        "run_seconds_estimate": cost["seconds"],
        # the run's peak (kept under its old name, which the CLI prints)
        "search_peak_bytes_estimate": int(cost["peak_bytes"]),
        "peak_bytes_estimate": int(cost["peak_bytes"]),
        "cost_inputs": asdict(inputs),
        "assumptions": describe_cost_model(costs, inputs),
    }


__all__ = [
    "CALIBRATION",
    "DEVICE_COSTS",
    "MEMORY_TOLERANCE",
    "TIME_TOLERANCE",
    "CostInputs",
    "check_feasible",
    "cost_model",
    "dry_run_config",
    "dry_run_summary",
    "estimate",
    "shape_only_model",
    "shipped_config_path",
]
