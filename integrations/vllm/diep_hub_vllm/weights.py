# Copyright 2026 the diep_hub authors. Apache-2.0.
"""Checking a diep checkpoint's expert tensors against its config while vLLM streams them, and unfusing them.

vLLM's fused-MoE loader does not notice a missing expert (another expert of the layer already marks the fused
parameter as loaded) and narrows an over-sized tensor to the parameter's shape, so a checkpoint whose tensors
contradict its config.json would load as a wrong model. Every routed-expert and router tensor (DeepSeek-V3's
selection bias included) is checked here (names, expert ids, shapes) and the load is refused, naming each problem,
as the remote code does in transformers. Checkpoints saved with ``fused_weights=True`` (``experts.gate_up_proj``
[E, 2I, H] with the gate half first, ``experts.down_proj`` [E, H, I], under ``mlp``) are split into the family's
per-expert names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from .plan import DiepServingError, ServingPlan

MAX_LISTED = 8
_LAYER = r"^(?P<pre>(?:.*\.)?layers\.(?P<layer>\d+)\.)(?P<block>[^.]+)\.experts\."
_PER_EXPERT = re.compile(_LAYER + r"(?P<idx>\d+)\.(?P<leaf>[^.]+)\.weight$")
_FUSED = re.compile(_LAYER + r"(?P<leaf>gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>[^.]+)\.gate\.weight$")
# DeepSeek-V3's selection-only bias, one entry per kept expert
_BIAS = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>[^.]+)\.gate\.e_score_correction_bias$")


class ExpertWeightCheck:
    """Wraps vLLM's weight stream: checks each expert/router tensor, then that nothing the config needs is missing."""

    def __init__(self, plan: ServingPlan, config, source: str = ""):
        self.plan = plan
        family = plan.family
        self.block = family.block_attr
        self.gate, self.down, self.up = family.leaves
        self.hidden = config.hidden_size
        self.ffn = getattr(config, family.ffn_field)
        self.source = source
        self.seen: set[tuple[int, int, str]] = set()
        self.routers: set[int] = set()
        self.wants_bias = family.grouped_scoring == "sigmoid"
        self.biases: set[int] = set()
        self.problems: list[str] = []

    def _shape(self, leaf: str) -> list[int]:
        return [self.hidden, self.ffn] if leaf == self.down else [self.ffn, self.hidden]

    def _fail(self, problems: list[str]) -> None:
        listed = "; ".join(problems[:MAX_LISTED])
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        where = f"checkpoint {self.source}" if self.source else "the checkpoint"
        raise DiepServingError(
            f"{where} does not match its config.json num_experts_per_layer {self._counts()} ({len(problems)} "
            f"problem(s): {listed}{more}); save the model again (diep_hub.save_pruned) or download it again"
        )

    def _counts(self) -> list:
        total = max(list(self.plan.layers) + list(self.plan.dense_layers)) + 1
        return [self.plan.layers[i].num_experts if i in self.plan.layers else None for i in range(total)]

    def _layer(self, name: str, layer: int):
        plan = self.plan.layers.get(layer)
        if plan is None:
            self.problems.append(f"{name} is unexpected (layer {layer} is dense in config.json)")
        return plan

    def stream(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Pass on the tensors that match the config; record the others (``finish`` refuses the load)."""
        for name, tensor in weights:
            fused = _FUSED.match(name)
            if fused is not None:
                yield from self._unfuse(name, fused, tensor)
                continue
            match = _PER_EXPERT.match(name)
            if match is not None and match["block"] == self.block:
                if self._check_expert(name, int(match["layer"]), int(match["idx"]), match["leaf"], tensor):
                    yield name, tensor
                continue
            bias = _BIAS.match(name)
            if bias is not None and bias["block"] == self.block:
                if self._check_bias(name, int(bias["layer"]), tensor):
                    yield name, tensor
                continue
            router = _ROUTER.match(name)
            if router is not None and router["block"] in (self.block, "mlp"):
                if not self._check_router(name, int(router["layer"]), tensor):
                    continue
                if router["block"] != self.block:  # transformers 5 names every family's block "mlp" when fused
                    name = name.replace(f".{router['block']}.gate.weight", f".{self.block}.gate.weight")
            yield name, tensor

    def _check_router(self, name: str, layer: int, tensor: torch.Tensor) -> bool:
        plan = self._layer(name, layer)
        if plan is None:
            return False
        self.routers.add(layer)
        want = [plan.num_experts, self.hidden]
        if list(tensor.shape) != want:
            self.problems.append(f"{name} has shape {list(tensor.shape)} but the config gives {want}")
            return False
        return True

    def _check_bias(self, name: str, layer: int, tensor: torch.Tensor) -> bool:
        plan = self._layer(name, layer)
        if plan is None:
            return False
        if not self.wants_bias:
            self.problems.append(f"{name} is unexpected ({self.plan.family.model_type} routes without a bias)")
            return False
        self.biases.add(layer)
        if list(tensor.shape) != [plan.num_experts]:
            self.problems.append(f"{name} has shape {list(tensor.shape)} but the config gives [{plan.num_experts}]")
            return False
        return True

    def _check_expert(self, name: str, layer: int, idx: int, leaf: str, tensor: torch.Tensor) -> bool:
        plan = self._layer(name, layer)
        if plan is None:
            return False
        if leaf not in (self.gate, self.down, self.up):
            self.problems.append(f"{name} is unexpected (expert tensors are {self.gate}, {self.down}, {self.up})")
            return False
        if idx >= plan.num_experts:
            self.problems.append(f"{name} is unexpected (layer {layer} keeps {plan.num_experts} experts)")
            return False
        if (layer, idx, leaf) in self.seen:
            self.problems.append(f"{name} appears twice")
            return False
        self.seen.add((layer, idx, leaf))
        want = self._shape(leaf)
        if list(tensor.shape) != want:
            self.problems.append(f"{name} has shape {list(tensor.shape)} but the config gives {want}")
            return False
        return True

    def _unfuse(self, name: str, match, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        layer = int(match["layer"])
        plan = self._layer(name, layer)
        if plan is None:
            return
        count = plan.num_experts
        gate_up = match["leaf"] == "gate_up_proj"
        want = [count, 2 * self.ffn, self.hidden] if gate_up else [count, self.hidden, self.ffn]
        leaves = (self.gate, self.up) if gate_up else (self.down,)
        if list(tensor.shape) != want:
            self.problems.append(f"{name} has shape {list(tensor.shape)} but the config gives {want}")
            self.seen.update((layer, idx, leaf) for idx in range(count) for leaf in leaves)
            return
        prefix = f"{match['pre']}{self.block}.experts"
        for idx in range(count):
            if gate_up:
                parts = ((self.gate, tensor[idx, : self.ffn]), (self.up, tensor[idx, self.ffn :]))
            else:
                parts = ((self.down, tensor[idx]),)
            for leaf, part in parts:
                per_expert = f"{prefix}.{idx}.{leaf}.weight"
                if self._check_expert(per_expert, layer, idx, leaf, part):
                    yield per_expert, part

    def finish(self) -> None:
        """Refuse the load, naming every problem: a tensor that did not match, or one the config needs that never
        came (a MoE layer's router or one of its kept experts' tensors)."""
        problems = list(self.problems)
        for layer, plan in sorted(self.plan.layers.items()):
            if layer not in self.routers:
                problems.append(f"layers.{layer}.{self.block}.gate.weight is missing")
            if self.wants_bias and layer not in self.biases:
                problems.append(f"layers.{layer}.{self.block}.gate.e_score_correction_bias is missing")
            for idx in range(plan.num_experts):
                for leaf in (self.gate, self.up, self.down):
                    if (layer, idx, leaf) not in self.seen:
                        problems.append(
                            f"layers.{layer}.{self.block}.experts.{idx}.{leaf}.weight is missing "
                            f"(layer {layer} keeps {plan.num_experts} experts)"
                        )
        if problems:
            self._fail(problems)
