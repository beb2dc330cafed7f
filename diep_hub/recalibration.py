"""Router recalibration: a short distillation of a pruned model's router rows towards the unpruned model.

After surgery a pruned layer's router still scores experts as if the removed ones existed: tokens that used a
removed expert fall to whatever the router ranks next, and families that do not renormalise the top-k weights
see different gate values. "Is Retraining-Free Enough? The Necessity of Router Calibration for Efficient MoE
Compression" (arXiv 2603.02217) finds most of the post-pruning loss in this router-expert mismatch, and recovers
much of it by distilling only the router on the original model's next-token distribution over unlabeled text.

``recalibrate_routers`` does that: the router weights of the pruned layers (the kept experts' rows: after surgery
those are the only rows) are trained with Adam and a cosine schedule for a few steps to minimise

    KL( softmax(head(h_teacher)) || softmax(head(h_pruned)) ), averaged over every calibration token,

h = the final hidden state entering the LM head. The teacher's hidden states can be cached from one pass of the
unpruned model before surgery (``teacher_hidden_states``), exactly as DiEP's search caches F(x), so the unpruned
model need not stay in memory; the LM head is the same in both models (surgery never touches it), so cached
hidden states give the teacher's logits. Every other weight is frozen and stays a bit-identical slice of the
unpruned model; router biases and DeepSeek-V3's selection bias are left as surgery sliced them.

With ``output_scales=True`` each kept expert of those layers also gets a trained output scale s_e (the issue's
"per-expert output scales"): a kept expert that now serves a removed one's tokens may need to speak louder or
softer. It is trained as log s_e (from 0) by scaling the routing weight that enters the experts module, which is
the same as scaling the expert's output, and when kept it is folded into the expert's output tensors
(``MoEFamily.expert_output_tensors``: ``down_proj``, and GPT-OSS's ``down_proj_bias``), so the checkpoint has no new
tensor and every runtime serves it unchanged. Those tensors are then the unpruned model's rows times a recorded
scale; every other tensor stays a bit-identical slice.

The loss on all calibration tokens is measured before and after; if training did not lower it, the routers are
restored and the record says ``applied: false`` (the option then costs time, never quality on calibration data).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS
from torch import nn

from .checkpoint.format import current_layer_plans
from .criteria.capture import check_input_ids, eval_mode, input_device
from .errors import ConfigError
from .families import MoELayer, get_family

logger = logging.getLogger(__name__)

#: which layers' routers are trained: those that lost experts, or every MoE layer
LAYER_CHOICES = ("pruned", "all")


@dataclass
class RecalibrationRecord:
    """What ``recalibrate_routers`` did, for the pruning report and the card.

    Attributes:
        layers: MoE layers whose router weights were trained.
        steps, lr, batch_size, seed: the optimisation (Adam, cosine schedule from ``lr`` to 0).
        loss: what was minimised (token-mean KL from the teacher's next-token distribution).
        loss_before, loss_after: that loss on every calibration token, before and after training (after is the
            value of the routers kept: equal to before when training did not help and was undone).
        applied: whether the trained routers were kept (False: restored, the loss did not go down).
        tokens: calibration tokens the loss is taken over.
        seconds: wall time.
        loss_curve: the training loss of each step (on its batch).
        output_scales: with ``output_scales=True``, {MoE layer: the scale folded into each kept expert's output
            tensors, in kept order} (all 1.0 when training was undone); None otherwise.
        output_scale_lr: the scales' learning rate (None without output scales).
    """

    layers: list[int]
    steps: int
    lr: float
    batch_size: int
    seed: int
    loss: str
    loss_before: float
    loss_after: float
    applied: bool
    tokens: int
    seconds: float
    loss_curve: list[float] = field(default_factory=list)
    output_scales: dict[int, list[float]] | None = None
    output_scale_lr: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the loss curve rounded to 6 digits)."""
        record = {
            "layers": list(self.layers),
            "steps": self.steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "loss": self.loss,
            "loss_before": round(self.loss_before, 6),
            "loss_after": round(self.loss_after, 6),
            "applied": self.applied,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "loss_curve": [round(v, 6) for v in self.loss_curve],
        }
        if self.output_scales is not None:
            record["output_scale_lr"] = self.output_scale_lr
            record["output_scales"] = {
                str(layer): [round(v, 6) for v in scales] for layer, scales in self.output_scales.items()
            }
        return record


@contextmanager
def _head_inputs(model: nn.Module, store: list[torch.Tensor]) -> Iterator[nn.Module]:
    """Record what enters the LM head on each forward; yields the head."""
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no output embeddings (LM head); recalibration needs a causal LM")
    handle = head.register_forward_pre_hook(lambda _m, args: store.append(args[0]))
    try:
        yield head
    finally:
        handle.remove()


def _batches(num_samples: int, batch_size: int) -> list[torch.Tensor]:
    return list(torch.split(torch.arange(num_samples), batch_size))


def teacher_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8, progress: bool = False
) -> torch.Tensor:
    """The final hidden states (LM head inputs) of ``model`` on the calibration tokens, [N, S, H] on CPU.

    Run it on the unpruned model before surgery and pass the result as ``teacher``: the unpruned model can then
    be pruned in place (or freed), and its next-token distributions are ``head(hidden)`` with the shared head.
    """
    check_input_ids(input_ids, batch_size)
    device = input_device(model)
    chunks = []
    with torch.no_grad(), eval_mode(model):
        for rows in tqdm(_batches(input_ids.shape[0], batch_size), desc="teacher pass", disable=not progress):
            store: list[torch.Tensor] = []
            with _head_inputs(model, store):
                model(input_ids=input_ids[rows].to(device), use_cache=False)
            chunks.append(store[-1].detach().to("cpu"))
    return torch.cat(chunks)


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Token-mean KL(teacher || student) over [..., V] logits, in float32."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def _select_layers(model: nn.Module, layers: str | Iterable[int]) -> list[MoELayer]:
    family = get_family(model)
    moe = {layer.index: layer for layer in family.moe_layers(model)}
    if isinstance(layers, str):
        if layers not in LAYER_CHOICES:
            raise ConfigError(f"layers={layers!r}: choose one of {list(LAYER_CHOICES)} or a list of MoE layer indices")
        if layers == "all":
            return list(moe.values())
        plans = current_layer_plans(model, family)
        chosen = [moe[i] for i, plan in plans.items() if plan.num_experts < plan.original_num_experts]
        if not chosen:
            raise ConfigError(
                "layers='pruned': no MoE layer of this model has lost experts (is it pruned yet?); prune it first, "
                "or pass layers='all' or a list of MoE layer indices"
            )
        return chosen
    indices = [int(i) for i in layers]
    unknown = sorted(set(indices) - set(moe))
    if unknown or not indices:
        raise ConfigError(f"layers={indices}: {unknown or 'no layers'} not MoE layer(s); MoE layers are {sorted(moe)}")
    return [moe[i] for i in sorted(set(indices))]


def _check_teacher(teacher, input_ids: torch.Tensor, hidden_size: int) -> None:
    if isinstance(teacher, nn.Module):
        return
    if not isinstance(teacher, torch.Tensor):
        raise ConfigError(
            f"teacher must be the unpruned model or its cached hidden states (teacher_hidden_states), "
            f"got {type(teacher).__name__}"
        )
    expected = (*input_ids.shape, hidden_size)
    if tuple(teacher.shape) != expected:
        raise ConfigError(
            f"teacher hidden states have shape {tuple(teacher.shape)}; expected {expected} "
            "([num_samples, seq_len, hidden_size] of these calibration tokens, from teacher_hidden_states)"
        )


@contextmanager
def _scaled_outputs(layers: list[MoELayer], log_scales: list[torch.Tensor]) -> Iterator[None]:
    """While open, each layer's experts see routing weights times exp(log scale) of the expert they route to: the
    same sum as scaling every expert's output, for every experts implementation (the hook sits on the call)."""

    def hook_for(layer: MoELayer, log_scale: torch.Tensor):
        def hook(_module, args):
            if len(args) < 3:
                raise ConfigError(
                    f"output scales: layer {layer.index}'s experts were called with {len(args)} positional "
                    "arguments; expected (hidden_states, expert indices, routing weights)"
                )
            hidden, index, weights = args[:3]
            scale = log_scale.exp().to(weights.device, weights.dtype)[index.to(weights.device)]
            return (hidden, index, weights * scale, *args[3:])

        return hook

    handles = [layer.experts.register_forward_pre_hook(hook_for(layer, s)) for layer, s in zip(layers, log_scales)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _fold_output_scales(layer: MoELayer, scale: torch.Tensor) -> None:
    """Multiply each kept expert's output tensors (``down_proj``, GPT-OSS's ``down_proj_bias``) by its scale."""
    with torch.no_grad():
        for name in layer.family.expert_output_tensors:
            tensor = getattr(layer.experts, name, None)
            if tensor is None:
                continue
            shaped = scale.to(tensor.device, tensor.dtype).reshape(-1, *([1] * (tensor.dim() - 1)))
            tensor.mul_(shaped)


def _scale_range(output_scales: dict[int, list[float]] | None) -> str:
    values = [v for scales in (output_scales or {}).values() for v in scales]
    return f", output scales {min(values):.4f}-{max(values):.4f}" if values else ""


def _check_numbers(steps: int, **rates: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r} must be an integer >= 1")
    for name, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1:
            raise ConfigError(f"{name}={rate!r} must be a number in (0, 1)")


def recalibrate_routers(
    pruned_model: nn.Module,
    teacher: nn.Module | torch.Tensor,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    steps: int = 32,
    lr: float = 1e-3,
    layers: str | Iterable[int] = "pruned",
    seed: int = 0,
    output_scales: bool = False,
    output_scale_lr: float = 3e-2,
    progress: bool = False,
) -> RecalibrationRecord:
    """Distil the pruned layers' router weights towards the unpruned model's next-token distribution, in place.

    Args:
        pruned_model: the model after surgery (``prune_experts`` / ``DiEPPruner``).
        teacher: the unpruned model, or its final hidden states on ``input_ids`` (``teacher_hidden_states``,
            computed before surgery: then only one model is in memory).
        input_ids: calibration tokens [num_samples, seq_len] (the pruning run's own).
        batch_size: sequences an optimiser step.
        steps: optimiser steps; batches are drawn in a seeded random order, one epoch after another.
        lr: Adam's learning rate at step 0 (cosine decay to 0).
        layers: "pruned" (layers that lost experts: their routers alone changed meaning), "all", or indices.
        seed: seeds the batch order; same seed, same routers.
        output_scales: also train one output scale per kept expert of those layers, folded into its output
            tensors when the result is kept (see the module docstring).
        output_scale_lr: Adam's learning rate for the log scales at step 0 (cosine decay to 0). Their own rate:
            at the routers' rate (3e-3) 32 steps move a scale by 5% at most, and the calibration KL barely moves.

    Returns:
        a ``RecalibrationRecord`` (steps, loss before and after, whether the result was kept).

    Raises:
        ConfigError: bad numbers, layers, teacher shape or calibration tokens (before anything changes).
    """
    started = time.perf_counter()
    check_input_ids(input_ids, batch_size)
    _check_numbers(steps, lr=lr, output_scale_lr=output_scale_lr)
    chosen = _select_layers(pruned_model, layers)
    hidden_size = pruned_model.config.get_text_config().hidden_size
    _check_teacher(teacher, input_ids, hidden_size)
    routers = [layer.router.weight for layer in chosen]
    saved = [w.detach().clone() for w in routers]
    log_scales = [
        torch.zeros(layer.num_experts, device=layer.router.weight.device, requires_grad=True)
        for layer in (chosen if output_scales else [])
    ]
    device = input_device(pruned_model)
    batches = _batches(input_ids.shape[0], batch_size)
    generator = torch.Generator().manual_seed(int(seed))

    def teacher_logits(rows: torch.Tensor, head: nn.Module) -> torch.Tensor:
        if isinstance(teacher, nn.Module):
            store: list[torch.Tensor] = []
            with torch.no_grad(), eval_mode(teacher), _head_inputs(teacher, store):
                teacher(input_ids=input_ids[rows].to(input_device(teacher)), use_cache=False)
            hidden = store[-1]
        else:
            hidden = teacher[rows]
        with torch.no_grad():
            return head(hidden.to(head.weight.device, head.weight.dtype))

    def loss_on(rows: torch.Tensor) -> torch.Tensor:
        store: list[torch.Tensor] = []
        with _head_inputs(pruned_model, store) as head, _scaled_outputs(chosen if output_scales else [], log_scales):
            pruned_model(input_ids=input_ids[rows].to(device), use_cache=False)
            student = head(store[-1])
            return _kl(student, teacher_logits(rows, head).to(student.device))

    def full_loss() -> float:
        with torch.no_grad():
            total = sum(float(loss_on(rows)) * rows.numel() for rows in batches)
        return total / input_ids.shape[0]

    saved_flags = [(p, p.requires_grad) for p in pruned_model.parameters()]
    curve: list[float] = []
    with eval_mode(pruned_model):
        try:
            for p, _ in saved_flags:
                p.requires_grad_(False)
            before = full_loss()
            for w in routers:
                w.requires_grad_(True)
            groups = [{"params": routers, "base_lr": lr}]
            if log_scales:
                groups.append({"params": log_scales, "base_lr": output_scale_lr})
            optimiser = torch.optim.Adam(groups, lr=lr)
            order: list[torch.Tensor] = []
            for step in tqdm(range(steps), desc="router recalibration", disable=not progress):
                if not order:
                    order = list(torch.split(torch.randperm(input_ids.shape[0], generator=generator), batch_size))
                rows = order.pop(0)
                for group in optimiser.param_groups:
                    group["lr"] = group["base_lr"] * 0.5 * (1.0 + math.cos(math.pi * step / steps))
                optimiser.zero_grad(set_to_none=True)
                loss = loss_on(rows)
                loss.backward()
                optimiser.step()
                curve.append(float(loss.detach()))
            for w in routers:
                w.requires_grad_(False)
            after = full_loss()
            applied = after < before
            if not applied:
                with torch.no_grad():
                    for w, old in zip(routers, saved):
                        w.copy_(old)
                logger.warning(
                    "router recalibration did not lower the calibration loss (%.6f -> %.6f): routers restored",
                    before,
                    after,
                )
                after = before
        except BaseException:
            with torch.no_grad():
                for w, old in zip(routers, saved):
                    w.copy_(old)
            raise
        finally:
            for p, flag in saved_flags:
                p.requires_grad_(flag)
    scales = {layer.index: log_scale.detach().exp() for layer, log_scale in zip(chosen, log_scales)}
    if applied:  # the scales full_loss measured become part of the weights
        for layer in chosen if output_scales else []:
            _fold_output_scales(layer, scales[layer.index])
    record = RecalibrationRecord(
        layers=[layer.index for layer in chosen],
        steps=steps,
        lr=float(lr),
        batch_size=batch_size,
        seed=int(seed),
        loss="token-mean KL(unpruned || pruned) of the next-token distribution",
        loss_before=before,
        loss_after=after,
        applied=applied,
        tokens=int(input_ids.numel()),
        seconds=time.perf_counter() - started,
        loss_curve=curve,
        output_scales=(
            {index: [float(v) if applied else 1.0 for v in scale] for index, scale in scales.items()}
            if output_scales
            else None
        ),
        output_scale_lr=float(output_scale_lr) if output_scales else None,
    )
    logger.info(
        "router recalibration of layers %s: %d steps, KL %.6f -> %.6f%s%s",
        record.layers,
        steps,
        before,
        record.loss_after,
        "" if applied else " (not applied)",
        _scale_range(record.output_scales),
    )
    return record


__all__ = ["LAYER_CHOICES", "RecalibrationRecord", "recalibrate_routers", "teacher_hidden_states"]
