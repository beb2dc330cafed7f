"""Neuron alignment for expert merging (``merge_removed_experts(align="weights")``): weight matching.

Two experts trained apart compute the same function with their intermediate neurons in any order; before averaging
them (:mod:`diep_hub.merging`), a merged expert's neurons are permuted to match the kept expert's. Neuron a is
described by its gate row, up row and down column; the permutation maximising the summed dot products is found with
the Hungarian algorithm (scipy). Only the gated layout ``gate_up_proj`` [E, 2I, H] (gate rows first) and
``down_proj`` [E, H, I] is read; other layouts are averaged unaligned.
"""

from __future__ import annotations

import torch

from .errors import ConfigError
from .families import MoELayer


def supports_alignment(layer: MoELayer) -> bool:
    """Whether the layer stores the gated layout weight matching reads: exactly ``gate_up_proj`` [E, 2I, H] (gate
    rows first) and ``down_proj`` [E, H, I]."""
    experts = layer.experts
    if tuple(n for n in layer.family.expert_tensors if getattr(experts, n, None) is not None) != (
        "gate_up_proj",
        "down_proj",
    ):
        return False
    gate_up, down = experts.gate_up_proj, experts.down_proj
    return gate_up.dim() == down.dim() == 3 and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == (
        down.shape[1]
    )


def alignment_shape(layer: MoELayer) -> tuple[int, int]:
    """(I, F) of one alignment in a layer that :func:`supports_alignment`: the intermediate neurons permuted and each
    neuron's features, its gate row, up row and down column (3 x hidden); the dry run sizes the work from them."""
    down = layer.experts.down_proj
    return int(down.shape[2]), 3 * int(down.shape[1])


def neuron_permutation(layer: MoELayer, kept: int, other: int) -> torch.Tensor:
    """The order of ``other``'s intermediate neurons that best matches ``kept``'s (weight matching): position a
    holds the neuron of ``other`` assigned to ``kept``'s neuron a, maximising the summed dot products of the
    neurons' [gate row, up row, down column] vectors (Hungarian algorithm)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - scipy comes with the project's dependencies
        raise ConfigError("align='weights' needs scipy (pip install scipy), or pass align='none'") from None
    gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
    width, _ = alignment_shape(layer)

    def features(e: int) -> torch.Tensor:
        g = gate_up[e].detach().to(torch.float64)
        return torch.cat([g[:width], g[width:], down[e].detach().to(torch.float64).T], dim=1)

    affinity = features(kept) @ features(other).T
    rows, cols = linear_sum_assignment(affinity.cpu().numpy(), maximize=True)
    order = torch.empty(width, dtype=torch.long)
    order[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return order


def aligned_rows(layer: MoELayer, name: str, expert: int, order: torch.Tensor | None) -> torch.Tensor:
    """Expert ``expert``'s slice of tensor ``name`` in float64, its intermediate neurons put in ``order``."""
    tensor = getattr(layer.experts, name)[expert].to(torch.float64)
    if order is None:
        return tensor
    order = order.to(tensor.device)
    if name == "gate_up_proj":
        width = order.numel()
        return torch.cat([tensor[:width].index_select(0, order), tensor[width:].index_select(0, order)])
    return tensor.index_select(1, order)  # down_proj [H, I]


__all__ = ["aligned_rows", "neuron_permutation", "supports_alignment"]
