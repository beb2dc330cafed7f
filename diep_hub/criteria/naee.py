"""NAEE (Lu et al. 2024, "Not All Experts are Equal"): exhaustive per-layer search for the kept subset whose MoE
output is closest to the original's.

Formula, for MoE layer l with N experts keeping k = num_to_keep[l]:
    S*^(l) = argmin_{S subset of {0..N-1}, |S| = k}  || F_S^(l)(X^(l)) - F^(l)(X^(l)) ||_F
where X^(l) are the calibration hidden states entering layer l's MoE block (from the unpruned model), F^(l) the
original block and F_S^(l) the block with every expert outside S removed, i.e. routed as if their router logits
were -inf (exactly what ``diep_hub.prune_experts`` builds: a router restricted to the rows of S, then top-k and
the family's renormalisation over S). Reference: Lu et al., "Not All Experts are Equal: Efficient Expert Pruning
and Skipping for Mixture-of-Experts Large Language Models", ACL 2024, https://arxiv.org/abs/2402.14800.

Grouped routing (DeepSeek) only accepts subsets with the same count from every group, so only those are searched.

Cost: C(N, k) subsets per layer (70 for Mixtral's 8 choose 4; about 1.8e18 for 64 choose 32). Layers where
C(N, k) exceeds ``max_combinations`` (default 10,000) are refused before any work, naming the layer, N, k and
the count.

How it is computed: every expert's output on the layer's calibration tokens is evaluated once per token chunk;
each subset then costs only its restricted routing plus a weighted sum. Shared experts and everything else in
the block do not depend on routing, so they cancel in the difference and need not be run.

Scores: 1 for the experts of S*, 0 for the others, plus a tie-break in [0, 0.5) that orders experts within each
group: 0.5 * (m_max - m_j) / (m_max - m_min), with m_j the smallest error of any subset that contains j. Kept
experts therefore always outrank dropped ones, and selection with the same per-layer counts keeps exactly S*.

Selection: uniform only (``selections``). The k of every layer is fixed before the search, and only uniform
selection keeps those counts; global selection would move removals between layers after the fact (at s=0.3 on
4 layers x 8 experts it removes round(9.6) = 10, not 4 x round(2.4) = 8), dropping members of S* in some layer and
keeping a subset whose error was never measured. ``DiEPPruner`` refuses that combination before calibration.
"""

from __future__ import annotations

import copy
import logging

import torch
from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS
from torch import nn

from ..errors import ConfigError
from ..families import MoELayer
from ..options import NAEEOptions
from ..surgery import count_group_subsets, group_subsets, plan_surgery
from .base import Criterion, ScoreResult, ScoringContext, parse_options, register_criterion
from .capture import capture_block_inputs, input_device

logger = logging.getLogger(__name__)

#: run settings the pruner hands NAEE beside its options (:class:`~diep_hub.options.NAEEOptions`), with defaults
RUN_SETTINGS = {"regroup": False, "progress": True}


def restricted_router(layer: MoELayer, keep_ids: list[int], regroup: bool = False) -> nn.Module:
    """A detached copy of ``layer.router`` that routes over ``keep_ids`` only (as surgery would leave it).

    Only the router's expert-indexed tensors are sliced (a few rows of [E, H]); the live model is untouched.
    Call it as ``type(layer.router).forward(view, hidden)``: that bypasses any hooks of the original module.
    """
    router, family = layer.router, layer.family
    view = copy.copy(router)
    view._parameters = dict(router._parameters)
    view._buffers = dict(router._buffers)
    index = torch.tensor(keep_ids, dtype=torch.long)
    for name in family.router_expert_tensors:
        tensor = getattr(router, name, None)
        if tensor is None:
            continue
        sliced = tensor.detach().index_select(0, index.to(tensor.device))
        if name in view._parameters:
            view._parameters[name] = sliced
        else:
            view._buffers[name] = sliced
    kept = len(keep_ids)
    for dotted in family.count_attrs:
        owner, attr = dotted.split(".", 1)
        if owner == "router":
            object.__setattr__(view, attr, kept)
    for dotted in family.top_k_attrs:
        owner, attr = dotted.split(".", 1)
        if owner == "router":
            object.__setattr__(view, attr, min(layer.top_k, kept))
    if regroup and family.has_grouped_routing:
        family.set_routing_groups(view, 1, 1)
    return view


def route(router_type: type, router: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index [T, k], top_k_weights [T, k]) of a router (or restricted view) on tokens [T, H]."""
    out = router_type.forward(router, hidden)
    return out[2].reshape(hidden.shape[0], -1), out[1].reshape(hidden.shape[0], -1)


def all_expert_outputs(layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
    """Every expert's unweighted output on every token: [N, T, H] (float32)."""
    tokens = hidden.shape[0]
    ones = torch.ones(tokens, 1, dtype=hidden.dtype, device=hidden.device)
    outputs = []
    for expert in range(layer.num_experts):
        index = torch.full((tokens, 1), expert, dtype=torch.long, device=hidden.device)
        outputs.append(layer.experts(hidden, index, ones).float())
    return torch.stack(outputs)


def combine(expert_outputs: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_s weights[t, s] * expert_outputs[index[t, s], t]: the routed part of a block's output, [T, H]."""
    tokens = torch.arange(index.shape[0], device=index.device).unsqueeze(1).expand_as(index)
    picked = expert_outputs[index.to(expert_outputs.device), tokens.to(expert_outputs.device)]
    return (picked * weights.to(picked.device, picked.dtype).unsqueeze(-1)).sum(dim=1)


def check_feasible(context: ScoringContext, max_combinations: int, regroup: bool) -> dict[int, int]:
    """Per-layer k, validated (present, in range, group-compatible, within the combination limit) before work."""
    if context.num_to_keep is None:
        raise ConfigError(
            "naee needs num_to_keep (experts each layer keeps) before scoring: it searches subsets of that size"
        )
    targets = {}
    for layer in context.layers:
        if layer.index not in context.num_to_keep:
            raise ConfigError(f"naee: num_to_keep has no entry for MoE layer {layer.index}")
        k = context.num_to_keep[layer.index]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= layer.num_experts:
            raise ConfigError(
                f"naee: num_to_keep[{layer.index}]={k!r} must be an integer between 1 and {layer.num_experts}"
            )
        n_group = layer.family.routing_rules(layer, context.model.config, regroup).n_group
        count = count_group_subsets(layer.num_experts, k, n_group)
        if count > max_combinations:
            what = (
                f"C({layer.num_experts}, {k})"
                if n_group == 1
                else f"C({layer.num_experts // n_group}, {k // n_group})^{n_group} (the same count from each group)"
            )
            raise ConfigError(
                f"naee: layer {layer.index} has N={layer.num_experts} experts and keeps k={k}, so the exhaustive "
                f"search would try {what} = {count:,} subsets, above "
                f"max_combinations={max_combinations:,}; raise options['max_combinations'] or use a criterion that "
                "scales with the expert count (diep, reap, frequency, soft_frequency)"
            )
        targets[layer.index] = k
    # The same floors and group rules surgery enforces (raises KeepMapError naming the layer), on a keep set of
    # each size that grouped routing could accept.
    layers = {layer.index: layer for layer in context.layers}
    placeholder = {}
    for index, k in targets.items():
        layer = layers[index]
        n_group = layer.family.routing_rules(layer, context.model.config, regroup).n_group
        size, per_group = layer.num_experts // n_group, k // n_group
        ids = [g * size + e for g in range(n_group) for e in range(per_group)] if k % n_group == 0 else list(range(k))
        placeholder[index] = ids
    plan_surgery(context.model, placeholder, regroup=regroup)
    return targets


@register_criterion
class NAEECriterion(Criterion):
    """Exhaustive per-layer subset search minimising the MoE block's output error (Frobenius)."""

    name = "naee"
    reference = "https://arxiv.org/abs/2402.14800"
    options = NAEEOptions
    needs_target_counts = True
    selections = ("uniform",)
    selection_reason = (
        "naee searches the best subset of a fixed size per layer, the uniform counts; global selection would "
        "change those counts after the search and keep subsets naee never evaluated"
    )

    @classmethod
    def _options(cls, options) -> dict:
        """Options and run settings as one dict (the names the search below uses), validated by NAEEOptions."""
        opts, run = parse_options(cls, options, RUN_SETTINGS)
        return {**opts.model_dump(), **run}

    def check_feasible(self, context: ScoringContext) -> None:
        opts = self._options(context.options)
        check_feasible(context, opts["max_combinations"], bool(opts["regroup"]))

    def score(self, context: ScoringContext) -> ScoreResult:
        opts = self._options(context.options)
        limit, chunk = opts["max_combinations"], opts["chunk_tokens"]
        targets = check_feasible(context, limit, bool(opts["regroup"]))

        scores, details = {}, {"best_error": {}, "kept": {}, "subsets": {}, "regroup": bool(opts["regroup"])}
        for layer in context.layers:
            k = targets[layer.index]
            best, per_expert_min, errors = self._search_layer(context, layer, k, bool(opts["regroup"]), chunk, opts)
            span = float(per_expert_min.max() - per_expert_min.min())
            tie_break = (per_expert_min.max() - per_expert_min) / span if span > 0 else torch.zeros_like(per_expert_min)
            layer_scores = 0.5 * tie_break.clamp(0.0, 0.999)
            layer_scores[list(best)] += 1.0
            scores[layer.index] = layer_scores.to(torch.float32)
            details["kept"][str(layer.index)] = list(best)
            details["best_error"][str(layer.index)] = float(errors.min())
            details["subsets"][str(layer.index)] = int(errors.numel())
            logger.info(
                "naee layer %d: kept %s of %d experts (error %.4g over %d subsets)",
                layer.index,
                list(best),
                layer.num_experts,
                float(errors.min()),
                errors.numel(),
            )
        ranking = "1 for the best subset + 0.5 * normalised best error of subsets containing the expert (tie-break)"
        return ScoreResult(scores=scores, ranking=ranking, details=details)

    @staticmethod
    def _search_layer(context: ScoringContext, layer: MoELayer, k: int, regroup: bool, chunk: int, opts: dict):
        """Errors of every k-subset of one layer; returns (best subset, per-expert min error, all errors)."""
        n_group = layer.family.routing_rules(layer, context.model.config, regroup).n_group
        subsets = group_subsets(layer.num_experts, k, n_group)
        router_type = type(layer.router)
        views = [restricted_router(layer, list(s), regroup) for s in subsets]
        keep_maps = [torch.tensor(s, dtype=torch.long) for s in subsets]
        squared = torch.zeros(len(subsets), dtype=torch.float64)
        inputs = capture_block_inputs(
            context.model, layer, context.input_ids, context.batch_size, progress=opts["progress"]
        )
        device = layer.router.weight.device
        if device.type == "meta":
            device = input_device(context.model)
        with torch.no_grad():
            tokens = torch.cat([h.reshape(-1, h.shape[-1]) for h in inputs])
            del inputs
            chunks = torch.split(tokens, chunk)
            bar = tqdm(total=len(chunks) * len(subsets), desc=f"NAEE layer {layer.index}", disable=not opts["progress"])
            for hidden in chunks:
                hidden = hidden.to(device)
                outputs = all_expert_outputs(layer, hidden)
                index, weights = route(router_type, layer.router, hidden)
                reference = combine(outputs, index, weights)
                for position, (view, keep) in enumerate(zip(views, keep_maps)):
                    sub_index, sub_weights = route(router_type, view, hidden)
                    output = combine(outputs, keep.to(sub_index.device)[sub_index], sub_weights)
                    squared[position] += float(((output - reference) ** 2).sum())
                    bar.update(1)
            bar.close()
        errors = squared.sqrt()
        best = subsets[int(torch.argmin(errors))]
        per_expert_min = torch.full((layer.num_experts,), float("inf"), dtype=torch.float64)
        for subset, error in zip(subsets, errors.tolist()):
            for expert in subset:
                per_expert_min[expert] = min(per_expert_min[expert], error)
        return best, per_expert_min, errors
