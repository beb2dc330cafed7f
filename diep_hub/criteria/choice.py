"""Validated choice: run several cheap criteria and keep the keep map that the held-out calibration tokens like best.

No single criterion wins on every model (benchmarks/VARIANTS.md: frequency on one zoo model, REAP on another, soft
frequency on a third), and which one wins shows in the pruned model's distance from the unpruned one. This criterion
measures that distance instead of guessing it:

1. the calibration sequences are split: the last ``ceil(validation_fraction * n)`` are held out, the rest "fit";
2. each candidate criterion scores the experts on the fit sequences with its own default options, and the run's
   own selection (``ScoringContext.select``: sparsity, global or uniform, floors, caps, group rules) turns its
   scores into a keep map;
3. each keep map is applied by masking the router (``router_logit_bias`` at ``MIN_LOG_GATE`` for every removed
   expert: what surgery does to routing, checked against surgery in tests/test_choice_criterion.py) and its mean
   per-token KL(unpruned || pruned) of the next-token distribution is measured on the held-out sequences;
4. the candidate with the lowest KL wins (ties: the first listed). Its fit-sequence scores are returned, so the
   pruner's selection rebuilds exactly the keep map that was validated.

Cost: one scoring pass per candidate on the fit sequences, plus (candidates + 1) forward passes over the held-out
sequences; the unpruned model's logits are computed one batch at a time, never stored for the whole set.
``details`` records every candidate's KL and per-layer counts, so the report shows what was compared.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Annotated

import torch
from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS
from pydantic import Field, field_validator

from ..errors import ConfigError
from ..options import CriterionOptions, Number
from .base import Criterion, ScoreResult, ScoringContext, get_criterion, parse_options, register_criterion
from .capture import eval_mode, input_device
from .router_bias import check_router_bias, removal_bias, router_logit_bias

logger = logging.getLogger(__name__)

NAME = "validated_choice"


class ChoiceOptions(CriterionOptions):
    """Which criteria compete and how much calibration data judges them."""

    candidates: tuple[str, ...] = Field(
        ("reap", "frequency", "soft_frequency"),
        description="the criteria compared (each with its default options), the tie-break order")
    validation_fraction: Annotated[float, Number(0, 1, lo_open=True, hi_open=True)] = Field(
        0.25, description="share of the calibration sequences held out to judge the candidates")

    @field_validator("candidates", mode="before")
    @classmethod
    def _known_candidates(cls, value):
        from .base import available_criteria

        names = list(value) if isinstance(value, (list, tuple)) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError("must be a non-empty list of criterion names")
        unknown = [n for n in names if n not in available_criteria() or n == NAME]
        if unknown:
            allowed = [n for n in available_criteria() if n != NAME]
            raise ValueError(f"unknown or not allowed candidate(s) {unknown}; allowed: {allowed}")
        if len(set(names)) != len(names):
            raise ValueError(f"lists a candidate twice: {names}")
        needs_counts = [n for n in names if get_criterion(n).needs_target_counts]
        if needs_counts:
            raise ValueError(f"{needs_counts} search subsets of fixed sizes and cannot be compared here")
        return tuple(names)


def split_calibration(input_ids: torch.Tensor, validation_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) sequences: the last ceil(fraction * n) sequences are held out; both parts non-empty."""
    num = int(input_ids.shape[0])
    held_out = math.ceil(validation_fraction * num)
    if num < 2 or held_out >= num:
        raise ConfigError(
            f"{NAME} needs calibration sequences both to score and to judge: num_samples={num} with "
            f"validation_fraction={validation_fraction} leaves none to score with; use num_samples >= 2 and a "
            "smaller validation_fraction"
        )
    return input_ids[: num - held_out], input_ids[num - held_out :]


def log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax in at least float32 (a bf16 model's logits are widened; a float64 model's stay float64)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def masked_kl(model, layers, keep_maps: list[dict[int, list[int]]], held_out: torch.Tensor, batch_size: int,
              progress: bool = False) -> list[float]:
    """Mean per-token KL(unpruned || pruned) of the next-token distribution on ``held_out``, one value per keep map.

    The pruned model is the unpruned one with every removed expert's router logit at ``MIN_LOG_GATE``; the
    unpruned logits of a batch are computed once and compared with every keep map before the next batch.
    """
    device = input_device(model)
    biases = [removal_bias(layers, keep) for keep in keep_maps]
    totals = [0.0] * len(keep_maps)
    tokens = 0
    batches = list(torch.split(held_out, batch_size))
    with torch.no_grad(), eval_mode(model):
        for batch in tqdm(batches, desc=f"{NAME}: judging candidates", disable=not progress):
            ids = batch.to(device)
            reference = log_probabilities(model(input_ids=ids).logits)
            tokens += reference.shape[0] * reference.shape[1]
            for position, bias in enumerate(biases):
                with router_logit_bias(layers, lambda p, bias=bias: bias[p]):
                    pruned = log_probabilities(model(input_ids=ids).logits)
                totals[position] += float((reference.exp() * (reference - pruned)).sum())
    return [total / tokens for total in totals]


@register_criterion
class ValidatedChoiceCriterion(Criterion):
    """The candidate criterion whose keep map stays closest to the unpruned model on held-out calibration tokens."""

    name = NAME
    reference = ""  # diep_hub's own: model selection on held-out calibration tokens
    options = ChoiceOptions
    needs_sparsity = True  # the keep maps compared depend on the sparsity

    def check_feasible(self, context: ScoringContext) -> None:
        parse_options(type(self), context.options, {"progress": True})
        if context.select is None:
            raise ConfigError(f"{NAME} compares keep maps of the run's selection: ScoringContext.select must be set "
                              "(DiEPPruner sets it)")
        placeholder = {layer.index: torch.linspace(1.0, 2.0, layer.num_experts) for layer in context.layers}
        if context.select(placeholder).regroup:
            raise ConfigError(
                f"{NAME} judges keep maps by masking the router, which routes as surgery does only when grouped "
                "routing keeps its groups; regroup=True resets them: use regroup=False or another criterion"
            )

    def score(self, context: ScoringContext) -> ScoreResult:
        self.check_feasible(context)
        opts, run = parse_options(type(self), context.options, {"progress": True})
        model, layers = context.model, context.layers
        hidden_size = model.config.get_text_config().hidden_size
        for layer in layers:
            check_router_bias(layer, hidden_size)
        fit, held_out = split_calibration(context.input_ids, opts.validation_fraction)

        results, keep_maps, counts = {}, [], {}
        for name in opts.candidates:
            sub = dataclasses.replace(context, input_ids=fit, options={"progress": False})
            results[name] = get_criterion(name)().score(sub)
            selection = context.select(results[name].scores)
            keep_maps.append(selection.keep)
            counts[name] = {str(k): len(v) for k, v in sorted(selection.keep.items())}
        kls = masked_kl(model, layers, keep_maps, held_out, int(context.batch_size), bool(run["progress"]))
        best = min(range(len(kls)), key=lambda i: (kls[i], i))
        chosen = opts.candidates[best]
        logger.info("%s: held-out KL per candidate %s; chose %s",
                    NAME, {n: round(k, 5) for n, k in zip(opts.candidates, kls)}, chosen)
        details = {
            "chosen": chosen,
            "candidates": {
                name: {"validation_kl": kls[i], "per_layer_kept": counts[name], "ranking": results[name].ranking}
                for i, name in enumerate(opts.candidates)
            },
            "fit_sequences": int(fit.shape[0]),
            "validation_sequences": int(held_out.shape[0]),
            "chosen_details": results[chosen].details,
        }
        return ScoreResult(scores=results[chosen].scores,
                           ranking=f"{chosen} ({results[chosen].ranking}), lowest held-out KL of "
                                   f"{list(opts.candidates)}",
                           details=details)
