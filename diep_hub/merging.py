"""Expert merging: fold each expert a keep map removes into its most similar kept expert, before surgery.

Plain removal throws a removed expert's weights away; its tokens are re-routed to the kept experts the router
ranks next. Merging (DiEP's appendix A.5; M-SMoE / MC-SMoE, Li et al. 2024, arXiv 2310.01334; HC-SMoE, Chen et al.
2024, arXiv 2410.08589) keeps part of what it computed: each removed expert j is assigned to the kept expert i of
the same layer whose outputs on the layer's calibration tokens are most similar, and i's fused weights become the
frequency-weighted average of its group,

    W_i <- (f_i W_i + sum_{j -> i} f_j W_j) / (f_i + sum_{j -> i} f_j)

for every expert tensor of the family (``gate_up_proj``, ``down_proj`` and GPT-OSS's biases), f = how often the
router put the expert in a token's top-k on the calibration data (a group nobody used is averaged uniformly).
Frequency weights keep a busy kept expert close to itself and let a rarely used one take on the work of the
expert that served its tokens.

Merging runs BEFORE surgery and changes only the kept experts' rows in place; surgery then slices the removed
rows away, so the checkpoint is as small as plain removal's (no tied copies) and router rows are those of plain
removal (the kept rows, unchanged). It works with any criterion: it reads only the keep map.

Similarity (``similarity``):
- ``output_cosine`` (default): cosine between two experts' outputs on the same tokens, concatenated over the
  tokens (so tokens with large outputs count more). Accumulated as an E x E Gram matrix batch by batch: memory is
  one batch of expert outputs per layer, whatever the token budget.
- ``output_cka``: linear CKA (``diep_hub.cka``, the paper's measure) between the experts' [tokens, H] outputs;
  it keeps the outputs of the token budget in memory (E x tokens x H for every pruned layer at once, plus an
  E x tokens^2 Gram table per layer): keep ``max_tokens`` small for large models.
Both evaluate every expert of a layer on the same tokens (at most ``max_tokens`` per layer, spread evenly over
the calibration batches): tokens the layer really receives, not only those the router sends to the pair.

Neuron alignment (``align``): two experts trained apart compute the same function with their intermediate neurons
in any order, and averaging unaligned neurons mixes unrelated ones. With ``align="weights"`` (default; M-SMoE's
weight matching, as Git Re-Basin) each removed expert's intermediate neurons are first permuted to match the kept
expert's: neuron a is described by its gate row, up row and down column, and the permutation maximising the sum
of dot products is found with the Hungarian algorithm (scipy). It needs the gated layout ``gate_up_proj`` [E, 2I,
H] (gate rows first) and ``down_proj`` [E, H, I]; a family stored otherwise (GPT-OSS: interleaved, transposed,
with biases) is averaged unaligned, and the record says so. Each merged expert costs one I x I assignment
(cubic in the expert width I): seconds for a few thousand, long for Mixtral-8x7B's 14336 (``align="none"``).

With grouped routing (DeepSeek-V3, not regrouped) a removed expert merges only into a kept expert of its own
group: surgery keeps every expert in its group, so that is where its tokens go.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .cka import centered_gram_vector, cka_matrix
from .criteria.capture import RoutingRecord, check_input_ids, routing_pass
from .errors import ConfigError
from .families import MoELayer, get_family
from .merge_alignment import aligned_rows, neuron_permutation, supports_alignment
from .surgery import plan_surgery

logger = logging.getLogger(__name__)

#: how two experts' similarity is measured (see the module docstring)
SIMILARITIES = ("output_cosine", "output_cka")
#: how the experts of a merge group are weighted
WEIGHTINGS = ("frequency",)
#: how a removed expert's intermediate neurons are matched to the kept expert's before averaging
ALIGNMENTS = ("weights", "none")


@dataclass(frozen=True)
class MergedExpert:
    """One removed expert folded into a kept one: its id, its share of the average, its similarity to the kept."""

    expert: int
    weight: float
    similarity: float


@dataclass(frozen=True)
class MergeGroup:
    """A kept expert after merging: its own share of the average and the removed experts folded into it."""

    kept: int
    weight: float
    merged: tuple[MergedExpert, ...]


@dataclass
class MergeRecord:
    """What ``merge_removed_experts`` did, for the pruning report and the card.

    Ids are those of the keep map (the layer's experts before this surgery; the report's ``kept_original_ids``
    maps them to the original model's numbering).

    Attributes:
        similarity, weighting: how partners were chosen and how each group was averaged.
        align: the neuron alignment asked for; ``aligned`` lists the layers where it was applied (a layout it
            does not support is averaged unaligned).
        max_tokens: the token budget per layer for the similarity.
        groups: layer -> kept id -> ``MergeGroup`` (only kept experts that absorbed at least one removed expert).
        frequencies: layer -> top-k selections per expert on the calibration tokens (merged layers only).
        tokens: layer -> tokens the similarity was measured on.
        calibration_tokens: tokens of the calibration pass.
    """

    similarity: str
    weighting: str
    max_tokens: int
    align: str = "weights"
    aligned: list[int] = field(default_factory=list)
    groups: dict[int, dict[int, MergeGroup]] = field(default_factory=dict)
    frequencies: dict[int, list[int]] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    calibration_tokens: int = 0

    @property
    def num_merged(self) -> int:
        """Removed experts folded into a kept one."""
        return sum(len(group.merged) for layer in self.groups.values() for group in layer.values())

    def partners(self, layer: int) -> dict[int, int]:
        """removed id -> kept id it was merged into, for one layer."""
        return {m.expert: kept for kept, group in self.groups.get(layer, {}).items() for m in group.merged}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``merges`` is layer -> kept id -> {weight, merged: [{expert, weight, similarity}]}."""
        return {
            "similarity": self.similarity,
            "weighting": self.weighting,
            "max_tokens": self.max_tokens,
            "align": self.align,
            "aligned_layers": list(self.aligned),
            "num_merged": self.num_merged,
            "calibration_tokens": self.calibration_tokens,
            "tokens": {str(k): v for k, v in self.tokens.items()},
            "frequencies": {str(k): v for k, v in self.frequencies.items()},
            "merges": {
                str(layer): {
                    str(kept): {
                        "weight": round(group.weight, 6),
                        "merged": [
                            {"expert": m.expert, "weight": round(m.weight, 6), "similarity": round(m.similarity, 6)}
                            for m in group.merged
                        ],
                    }
                    for kept, group in sorted(groups.items())
                }
                for layer, groups in sorted(self.groups.items())
            },
        }

    def summary_lines(self) -> list[str]:
        """One line a layer, for logs and the card: ``layer 2: 5 <- 1 (0.25, cos 0.91), 7 (0.10, cos 0.88)``."""
        lines = []
        for layer, groups in sorted(self.groups.items()):
            parts = []
            for kept, group in sorted(groups.items()):
                folded = ", ".join(f"{m.expert} ({m.weight:.2f}, sim {m.similarity:.2f})" for m in group.merged)
                parts.append(f"{kept} <- {folded}")
            lines.append(f"layer {layer}: " + "; ".join(parts))
        return lines


def _check_options(similarity: str, weighting: str, max_tokens: int, align: str) -> None:
    if align not in ALIGNMENTS:
        raise ConfigError(f"align={align!r} is not a neuron alignment; choose one of {list(ALIGNMENTS)}")
    if similarity not in SIMILARITIES:
        raise ConfigError(f"similarity={similarity!r} is not a merge similarity; choose one of {list(SIMILARITIES)}")
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting={weighting!r} is not a merge weighting; choose one of {list(WEIGHTINGS)}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise ConfigError(f"max_tokens={max_tokens!r} must be an integer >= 2 (tokens per layer for the similarity)")


def expert_outputs(layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
    """Every expert's unweighted output on the same tokens: [E, T, H], through the layer's own experts module
    (each token sent to each expert with weight 1), so every family and experts backend is handled alike."""
    num_experts, tokens = layer.num_experts, hidden.shape[0]
    repeated = hidden.repeat(num_experts, 1)
    index = torch.arange(num_experts, device=hidden.device).repeat_interleave(tokens).reshape(-1, 1)
    ones = torch.ones(index.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
    return layer.experts(repeated, index, ones).reshape(num_experts, tokens, -1)


class _LayerStatistics:
    """Frequencies and similarity statistics of one layer, accumulated batch by batch."""

    def __init__(self, layer: MoELayer, similarity: str, quota: int, max_tokens: int):
        self.layer = layer
        self.similarity = similarity
        self.quota = quota
        self.max_tokens = max_tokens
        self.counts = torch.zeros(layer.num_experts, dtype=torch.int64)
        self.gram = torch.zeros(layer.num_experts, layer.num_experts, dtype=torch.float64)
        self.outputs: list[torch.Tensor] = []  # output_cka: [E, t, H] per batch
        self.tokens = 0

    def add(self, record: RoutingRecord) -> None:
        index = record.top_k_index.reshape(-1)
        index = index[index < self.layer.num_experts].to("cpu", torch.int64)  # skipped slots count for nobody
        self.counts += torch.bincount(index, minlength=self.layer.num_experts)
        take = min(self.quota, self.max_tokens - self.tokens, record.hidden.shape[0])
        if take <= 0:
            return
        positions = torch.linspace(0, record.hidden.shape[0] - 1, take).round().long().to(record.hidden.device)
        outputs = expert_outputs(self.layer, record.hidden.index_select(0, positions))
        self.tokens += take
        if self.similarity == "output_cosine":
            flat = outputs.reshape(outputs.shape[0], -1).to(torch.float64)
            self.gram += (flat @ flat.T).cpu()
        else:
            self.outputs.append(outputs.detach().to("cpu", torch.float32))

    def similarity_matrix(self) -> torch.Tensor:
        """E x E similarity in [-1, 1] (cosine) or [0, 1] (CKA); an expert with zero output is similar to none."""
        if self.similarity == "output_cosine":
            norms = self.gram.diagonal().clamp_min(0).sqrt()
            denominator = norms[:, None] * norms[None, :]
            return torch.where(denominator > 0, self.gram / denominator.clamp_min(1e-300), 0.0)
        outputs = torch.cat(self.outputs, dim=1)
        vectors = torch.stack([centered_gram_vector(outputs[e]) for e in range(outputs.shape[0])])
        return cka_matrix(vectors)


def _group_of(expert: int, num_experts: int, n_group: int) -> int:
    return expert // (num_experts // n_group)


def plan_merges(
    layer: MoELayer,
    keep_ids: Iterable[int],
    similarity: torch.Tensor,
    counts: torch.Tensor,
    *,
    n_group: int = 1,
) -> dict[int, MergeGroup]:
    """Assign every removed expert to its most similar kept expert (ties: the more frequent, then the lower id)
    and weight each group by frequency. With ``n_group`` > 1 only kept experts of the same routing group qualify.

    Returns:
        kept id -> MergeGroup, for kept experts that absorb at least one removed expert.
    """
    kept = list(keep_ids)
    num_experts = layer.num_experts
    removed = [e for e in range(num_experts) if e not in set(kept)]
    absorbed: dict[int, list[tuple[int, float]]] = {}
    for j in removed:
        candidates = [i for i in kept if n_group <= 1 or _group_of(i, num_experts, n_group) == _group_of(
            j, num_experts, n_group)] or kept
        best = max(candidates, key=lambda i: (float(similarity[j, i]), int(counts[i]), -i))
        absorbed.setdefault(best, []).append((j, float(similarity[j, best])))
    groups = {}
    for i, members in sorted(absorbed.items()):
        ids = [i] + [j for j, _ in members]
        total = sum(int(counts[e]) for e in ids)
        share = {e: (int(counts[e]) / total if total > 0 else 1.0 / len(ids)) for e in ids}
        groups[i] = MergeGroup(
            kept=i,
            weight=share[i],
            merged=tuple(MergedExpert(expert=j, weight=share[j], similarity=s) for j, s in members),
        )
    return groups


def apply_merges(layer: MoELayer, groups: Mapping[int, MergeGroup], *, align: str = "none") -> bool:
    """Overwrite each kept expert's rows of every expert tensor with its group's weighted average, in place.

    With ``align="weights"`` (and a layout that supports it) each merged expert's neurons are permuted to match
    the kept expert's first. The average is formed in float64 and cast back to the tensor's dtype; removed
    experts' rows are left as they are (surgery drops them). Returns whether neurons were aligned.
    """
    aligned = align == "weights" and supports_alignment(layer)
    with torch.no_grad():
        orders = {
            (kept, m.expert): neuron_permutation(layer, kept, m.expert) if aligned else None
            for kept, group in groups.items()
            for m in group.merged
        }
        averages = {}
        for name in layer.family.expert_tensors:
            if getattr(layer.experts, name, None) is None:
                continue
            for kept, group in groups.items():
                total = group.weight * aligned_rows(layer, name, kept, None)
                for m in group.merged:
                    total = total + m.weight * aligned_rows(layer, name, m.expert, orders[(kept, m.expert)])
                averages[(name, kept)] = total
        for (name, kept), average in averages.items():
            tensor = getattr(layer.experts, name)
            tensor[kept].copy_(average.to(tensor.dtype))
    return aligned


#: tokens per layer on which every expert runs for the similarity, by default (the dry run counts them)
MAX_TOKENS = 1024


def merge_removed_experts(
    model: nn.Module,
    keep: Mapping[int, Iterable[int]],
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    similarity: str = "output_cosine",
    weighting: str = "frequency",
    max_tokens: int = MAX_TOKENS,
    align: str = "weights",
    regroup: bool | Iterable[int] = False,
    allow_below_top_k: bool = False,
    progress: bool = False,
) -> MergeRecord:
    """Fold each expert the keep map removes into its most similar kept expert of the same layer, in place.

    Call it on the unpruned model right before ``prune_experts(model, keep)``: the kept experts' weights change
    here, surgery then removes the others, so the checkpoint holds no copies. Nothing but kept experts' rows of
    the fused expert tensors changes (routers, shared experts, attention stay bit-identical).

    Args:
        model: a supported MoE causal LM (stock or already pruned), not yet cut by this keep map.
        keep: ``{layer index: expert ids to keep}``, as ``prune_experts`` takes it; checked the same way first
            (``regroup`` and ``allow_below_top_k`` as there), so a bad map changes nothing.
        input_ids: calibration tokens [num_samples, seq_len]; one forward pass over them measures frequencies and
            the experts' outputs on the tokens each MoE layer receives.
        batch_size: sequences a forward pass.
        similarity: "output_cosine" or "output_cka" (module docstring).
        weighting: "frequency" (top-k selections on the calibration tokens).
        max_tokens: tokens per layer on which every expert is evaluated for the similarity.
        align: "weights" (match each merged expert's neurons to the kept expert's first) or "none".
        progress: show a progress bar for the calibration pass.

    Returns:
        a ``MergeRecord`` (layer -> kept id -> the removed ids folded into it, with their weights).

    Raises:
        KeepMapError: the keep map does not fit the model (before anything changes).
        ConfigError: an unknown similarity or weighting, a bad token budget or bad calibration tokens.
    """
    _check_options(similarity, weighting, max_tokens, align)
    check_input_ids(input_ids, batch_size)
    plan = plan_surgery(model, keep, regroup=regroup, allow_below_top_k=allow_below_top_k)
    family = get_family(model)
    record = MergeRecord(similarity=similarity, weighting=weighting, max_tokens=max_tokens, align=align)
    pruned = [s for s in plan if len(s.keep_ids) < s.layer.num_experts]
    if not pruned:
        return record
    num_batches = math.ceil(input_ids.shape[0] / batch_size)
    quota = math.ceil(max_tokens / num_batches)
    stats = {s.layer.index: _LayerStatistics(s.layer, similarity, quota, max_tokens) for s in pruned}
    record.calibration_tokens = routing_pass(
        model,
        [s.layer for s in pruned],
        input_ids,
        batch_size,
        lambda r: stats[r.layer.index].add(r),
        desc="merge statistics",
        progress=progress,
    )
    for surgery in pruned:
        layer = surgery.layer
        layer_stats = stats[layer.index]
        rules = family.routing_rules(layer, model.config, regroup=surgery.regroup)
        groups = plan_merges(
            layer, surgery.keep_ids, layer_stats.similarity_matrix(), layer_stats.counts, n_group=rules.n_group
        )
        if apply_merges(layer, groups, align=align):
            record.aligned.append(layer.index)
        record.groups[layer.index] = groups
        record.frequencies[layer.index] = [int(c) for c in layer_stats.counts]
        record.tokens[layer.index] = layer_stats.tokens
    for line in record.summary_lines():
        logger.info("merged %s", line)
    return record


__all__ = [
    "ALIGNMENTS",
    "SIMILARITIES",
    "WEIGHTINGS",
    "MergeGroup",
    "MergeRecord",
    "MergedExpert",
    "apply_merges",
    "expert_outputs",
    "merge_removed_experts",
    "neuron_permutation",
    "plan_merges",
    "supports_alignment",
]
