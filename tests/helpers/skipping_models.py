"""Pruned tiny models and hand-set calibrations for the expert-skipping tests (test_skipping_*.py)."""

from __future__ import annotations

import torch

import diep_hub
from diep_hub.families import get_family
from diep_hub.skipping import LayerSkipping, SkippingCalibration
from tests.helpers.tiny_models import sample_input_ids, tiny_model

IDS = sample_input_ids(batch=3, length=12)


def keep_map(model) -> dict[int, list[int]]:
    """A non-uniform prune (6, 4, 8, ... experts in scrambled order) valid for every family's floors, and for
    DeepSeek's grouped routing (n_group=2: the same count from experts 0-3 and 4-7, group by group)."""
    layers = [layer.index for layer in get_family(model).moe_layers(model)]
    choices = [[3, 0, 2, 6, 4, 5], [1, 3, 7, 4], list(range(8))]
    return {index: choices[i % len(choices)] for i, index in enumerate(layers)}


def pruned(family: str, seed: int = 0):
    model = tiny_model(family, seed=seed)
    return diep_hub.prune_experts(model, keep_map(model))


def forced_calibration(model, gamma1: float, cka_value: float = 1.0) -> SkippingCalibration:
    """A calibration with chosen thresholds: cka_ratio filled with ``cka_value`` (diagonal 1)."""
    layers = {}
    for layer in get_family(model).moe_layers(model):
        n = layer.num_experts
        ratio = torch.full((n, n), cka_value)
        ratio.fill_diagonal_(1.0)
        layers[layer.index] = LayerSkipping(gamma1, ratio.clone(), ratio, 0, 0.0)
    return SkippingCalibration(kernel="linear", layers=layers, num_tokens=0, cka_tokens=0)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def routing_recorder(model, *, after_skipping: bool):
    """Pre-hooks recording (index, weights) each layer's experts receive: before or after the skipping hook."""
    seen: dict[int, list] = {}
    handles = []
    for layer in get_family(model).moe_layers(model):

        def hook(module, args, index=layer.index):
            seen.setdefault(index, []).append((args[1].clone(), args[2].detach().clone()))

        handles.append(layer.experts.register_forward_pre_hook(hook, prepend=not after_skipping))
    return seen, handles

