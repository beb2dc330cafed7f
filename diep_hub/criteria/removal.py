"""Removal-aware DiEP: learn which experts to keep while the model runs with experts removed.

The paper's search (``criteria/diep.py``) scales expert outputs and never shows the model an expert removed, so
it cannot learn what a removal costs (benchmarks/RESULTS.md). This search moves the learned variable to where
surgery acts: the router. Each routed expert e of MoE layer l has a keep logit theta and a gate z in [0, 1];
log z is added to the expert's router logit before the router's own activation, grouping, top-k and
renormalisation. At z = 1 the layer is the unpruned one; at z = 0 the expert's tokens go to the experts that would
take them after surgery (exactly so for softmax routers, where a -inf logit is the same as deleting the router row;
tests/test_removal_search.py compares with surgery for every family).

Loss of one model: next-token CE + lambda * || F'(x) - F(x) ||_F, DiEP's Eq. 7 with the same reconstruction target
(the unpruned last hidden state). The search minimises its expectation over keep masks drawn with
P(keep e) = keep_probability(theta_e), plus budget_weight * ((E[kept] - K) / K)^2, where E[kept] sums the keep
probabilities over ALL experts of all layers and K is the number kept at the target sparsity: one global budget,
so the allocation across layers is learned jointly (under uniform selection, whose counts are fixed before scoring,
the budget holds per layer instead).

Two estimators of the gradient (option ``estimator``):
    "reinforce" (default)  each step draws ``masks`` hard keep/remove masks (every layer keeps at least its top-k),
                           runs each on the same batch (forward only) and uses the score-function gradient with a
                           leave-one-out baseline: sum_i (L_i - mean_{j != i} L_j) * (m_i - p) / M. Every sampled
                           model has experts truly removed, so the gradient is what removal costs.
    "concrete"             hard-concrete gates (Louizos et al. 2018, https://arxiv.org/abs/1712.01312; b = 2/3,
                           gamma = -0.1, zeta = 1.1), a share of them exactly 0 or 1, with the pathwise gradient
                           through the gates in between.

Start: theta is initialised from soft frequency (or another cheap criterion, option ``init``) so that the sampled
models already have about the target sparsity at step 0, rather than at the trained model's stationary point
where the paper's gated search barely moves. Scores: keep_probability(theta) after the search, one global ranking.
Defaults and how they compare with the other criteria: benchmarks/QUALITY_SEEDS.md and REMOVAL_TUNING.md.

Needs the target sparsity (``ScoringContext.sparsity``): the budget depends on it, so scores are per sparsity.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, Literal

import torch
from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from ..options import Count, CriterionOptions, Number
from .base import Criterion, ScoreResult, ScoringContext, get_criterion, parse_options, register_criterion
from .capture import eval_mode, input_device
from .diep import DiEPCriterion, check_search_inputs, checkpointing_mode, cosine_lr, frozen_weights
from .router_bias import MIN_LOG_GATE, check_router_bias, router_logit_bias

logger = logging.getLogger(__name__)

#: hard-concrete stretch and temperature (Louizos et al. 2018)
GAMMA, ZETA, TEMPERATURE = -0.1, 1.1, 2.0 / 3.0


class RemovalOptions(CriterionOptions):
    """The removal-aware search's settings; defaults chosen on the tuning zoo models (benchmarks/QUALITY_SEEDS.md)."""

    estimator: Literal["reinforce", "concrete"] = Field(
        "reinforce", description="reinforce (hard keep/remove masks, score-function gradient) or concrete "
                                 "(hard-concrete gates, pathwise gradient)")
    epochs: Count = Field(5, description="search epochs over the calibration set")
    lr: Annotated[float, Number(0, lo_open=True)] = Field(0.3, description="learning rate of the keep logits (Adam)")
    lambda_: Annotated[float, Number(0)] = Field(0.01, alias="lambda",
                                                 description="weight of the reconstruction loss (as DiEP's Eq. 7)")
    budget_weight: Annotated[float, Number(0)] = Field(
        10.0, description="weight of the squared relative gap between expected and target kept experts")
    init: Literal["soft_frequency", "reap", "frequency", "uniform"] = Field(
        "soft_frequency", description="the cheap criterion the keep probabilities start from")
    init_spread: Annotated[float, Number(0, lo_open=True)] = Field(
        2.0, description="how far apart the starting keep logits are, per standard deviation of the start scores")
    masks: Annotated[int, Number(2, integer=True)] = Field(
        4, description="masks per batch for the reinforce estimator (leave-one-out baseline)")


def validate_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The options as a plain dict (``lambda_`` as ``recon_weight``) plus ``progress``; ConfigError names the field,
    the value and what is allowed."""
    model, run = parse_options(RemovalAwareCriterion, options, {"progress": True})
    opts = model.model_dump()
    opts["recon_weight"] = opts.pop("lambda_")
    return {**opts, **run}


def keep_probability(theta: torch.Tensor) -> torch.Tensor:
    """P(z > 0) of a hard-concrete gate with location ``theta``."""
    return torch.sigmoid(theta - TEMPERATURE * math.log(-GAMMA / ZETA))


def theta_for_probability(probability: torch.Tensor) -> torch.Tensor:
    """The location whose P(z > 0) is ``probability`` (inverse of ``keep_probability``)."""
    return torch.logit(probability) + TEMPERATURE * math.log(-GAMMA / ZETA)


def sample_gates(theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One hard-concrete sample per expert, in [0, 1], differentiable in ``theta`` where it is not clamped."""
    u = torch.rand(theta.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + theta) / TEMPERATURE)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _shift_to_sum(logits: torch.Tensor, target: float) -> torch.Tensor:
    """sigmoid(logits + c) with c found by bisection so that the probabilities sum to ``target``."""
    low, high = -30.0, 30.0
    for _ in range(80):
        mid = (low + high) / 2
        if torch.sigmoid(logits + mid).sum().item() > target:
            high = mid
        else:
            low = mid
    return torch.sigmoid(logits + (low + high) / 2).clamp(1e-4, 1 - 1e-4)


def initial_theta(
    context: ScoringContext, init: str, spread: float, kept_target: int, layer_targets: dict[int, int] | None = None
) -> dict[int, torch.Tensor]:
    """Gate locations whose keep probabilities follow a cheap criterion and sum to the kept target.

    The criterion's per-layer scores are made comparable across layers as log(score * N_l / sum(score)) (0 for an
    expert used as often as the layer's average), standardised over all experts, and mapped through
    sigmoid(spread * u + c), with c found by bisection so that the probabilities sum to ``kept_target``; with
    ``layer_targets`` (uniform selection: counts fixed per layer) one c per layer, summing to that layer's count.
    """
    layers = context.layers
    if init == "uniform":
        relative = {layer.index: torch.zeros(layer.num_experts) for layer in layers}
    else:
        sub = ScoringContext(
            model=context.model,
            family=context.family,
            layers=layers,
            input_ids=context.input_ids,
            batch_size=context.batch_size,
            seed=context.seed,
            options={"progress": False},
        )
        scores = get_criterion(init)().score(sub).scores
        relative = {}
        for layer in layers:
            s = scores[layer.index].double().clamp_min(1e-12)
            relative[layer.index] = torch.log(s * layer.num_experts / s.sum()).float()
    flat = torch.cat([relative[layer.index] for layer in layers])
    std = flat.std() if flat.numel() > 1 else torch.tensor(0.0)
    u = (flat - flat.mean()) / std if std > 1e-8 else torch.zeros_like(flat)
    out, start = {}, 0
    if layer_targets is None:
        theta = theta_for_probability(_shift_to_sum(spread * u, kept_target))
    for layer in layers:
        part = u[start : start + layer.num_experts]
        if layer_targets is None:
            out[layer.index] = theta[start : start + layer.num_experts].clone()
        else:
            out[layer.index] = theta_for_probability(_shift_to_sum(spread * part, layer_targets[layer.index]))
        start += layer.num_experts
    return out


@register_criterion
class RemovalAwareCriterion(Criterion):
    """Keep gates on the router, trained under a global budget of kept experts: see the module docstring."""

    name = "diep_removal"
    reference = "https://arxiv.org/abs/2509.16105"
    options = RemovalOptions
    needs_sparsity = True

    def score(self, context: ScoringContext) -> ScoreResult:
        opts = validate_options(context.options)
        model, layers, input_ids = context.model, context.layers, context.input_ids
        check_search_inputs(layers, input_ids)
        sparsity = context.sparsity
        if sparsity is None or not 0 < sparsity < 1:
            raise ConfigError(f"the removal-aware search needs the target sparsity in (0, 1), got {sparsity!r}")
        total = sum(layer.num_experts for layer in layers)
        kept_target = total - round(sparsity * total)
        hidden_size = model.config.get_text_config().hidden_size
        for layer in layers:
            check_router_bias(layer, hidden_size)

        batch_size = int(context.batch_size)
        num_samples = input_ids.shape[0]
        batches = list(torch.split(torch.arange(num_samples), batch_size))
        total_steps = len(batches) * opts["epochs"]
        device = input_device(model)
        generator = torch.Generator().manual_seed(int(context.seed))

        # Uniform selection fixes each layer's count before scoring (the pruner passes it as num_to_keep): the
        # budget then holds per layer, so that the search ranks experts within the counts selection will keep.
        layer_targets = context.num_to_keep
        if layer_targets is not None:
            kept_target = sum(layer_targets[layer.index] for layer in layers)
        theta0 = initial_theta(context, opts["init"], float(opts["init_spread"]), kept_target, layer_targets)
        theta = nn.ParameterList([nn.Parameter(theta0[layer.index].clone()) for layer in layers])
        optimiser = torch.optim.Adam(theta.parameters(), lr=opts["lr"])
        gates: dict[int, torch.Tensor] = {}

        def bias(position: int) -> torch.Tensor:
            return torch.log(gates[position].clamp_min(math.exp(MIN_LOG_GATE)))

        curve: list[dict[str, float]] = []
        with frozen_weights(model), eval_mode(model):
            targets = DiEPCriterion._reference_outputs(model, input_ids, batches, device, opts["progress"])
            bar = tqdm(total=total_steps, desc="DiEP removal-aware search", disable=not opts["progress"])
            step = 0
            with router_logit_bias(layers, bias), checkpointing_mode(model):
                for _epoch in range(opts["epochs"]):
                    order = torch.randperm(num_samples, generator=generator)
                    for rows in torch.split(order, batch_size):
                        for group in optimiser.param_groups:
                            group["lr"] = cosine_lr(opts["lr"], step, total_steps)
                        optimiser.zero_grad(set_to_none=True)
                        if opts["estimator"] == "reinforce":
                            ce, recon = self._reinforce_step(theta, gates, layers, opts, model, generator,
                                                             input_ids[rows], targets[rows], device)
                        else:
                            for position, location in enumerate(theta):
                                gates[position] = sample_gates(location, generator)
                            ce, recon = DiEPCriterion._loss(model, input_ids[rows], targets[rows], device)
                        expected = sum(keep_probability(location).sum() for location in theta)
                        if layer_targets is None:
                            budget = ((expected - kept_target) / kept_target) ** 2
                        else:
                            budget = sum(
                                ((keep_probability(location).sum() - layer_targets[layer.index])
                                 / layer_targets[layer.index]) ** 2
                                for location, layer in zip(theta, layers)
                            ) / len(layers)
                        loss = ce + opts["recon_weight"] * recon + opts["budget_weight"] * budget.to(ce.device)
                        loss.backward()
                        optimiser.step()
                        curve.append(
                            {
                                "total": loss.item(),
                                "ce": ce.item(),
                                "recon": recon.item(),
                                "expected_kept": expected.item(),
                            }
                        )
                        bar.update(1)
                        bar.set_postfix(loss=f"{curve[-1]['total']:.4f}", kept=f"{curve[-1]['expected_kept']:.1f}")
                        step += 1
            bar.close()

        scores = {}
        with torch.no_grad():
            for position, layer in enumerate(layers):
                scores[layer.index] = keep_probability(theta[position].detach().float()).cpu().contiguous()
        details = {
            "kept_target": kept_target,
            "budget": "global" if layer_targets is None else "per layer",
            "sparsity": sparsity,
            "init": opts["init"],
            "initial_keep_probability": {
                str(layer.index): keep_probability(theta0[layer.index]).tolist() for layer in layers
            },
            "theta": {str(layer.index): theta[p].detach().tolist() for p, layer in enumerate(layers)},
            "loss_curve": curve,
            "hyperparameters": {
                **{k: v for k, v in opts.items() if k != "progress"},
                "batch_size": batch_size,
                "num_samples": num_samples,
                "seq_len": int(input_ids.shape[1]),
                "seed": int(context.seed),
                "optimizer": "Adam",
                "lr_schedule": "cosine",
                "gates": f"hard concrete (b={TEMPERATURE:.3f}, gamma={GAMMA}, zeta={ZETA}) on the router logits",
            },
        }
        logger.info(
            "removal-aware search: %d steps, loss %.4f -> %.4f, expected kept %.1f (target %d)",
            total_steps,
            curve[0]["total"],
            curve[-1]["total"],
            curve[-1]["expected_kept"],
            kept_target,
        )
        return ScoreResult(scores=scores, ranking="P(keep gate > 0)", details=details)

    @staticmethod
    def _reinforce_step(theta, gates, layers, opts, model, generator, batch, target, device):
        """Score-function gradient of E_m[loss(m)] for masks m drawn with P(keep) = keep_probability(theta).

        ``opts["masks"]`` hard keep/remove masks are run on the same batch (forward only); each mask's advantage is
        its loss minus the mean loss of the others (leave-one-out baseline), and d log P(m) / d theta = m - P.
        Every layer keeps at least its top-k experts in a mask (the most likely ones are put back), so no layer is
        ever emptied. The gradient is left in ``theta[...].grad``; the returned (ce, recon) are the masks' means,
        detached, for the loss curve.
        """
        count = opts["masks"]
        probabilities = [keep_probability(location.detach()) for location in theta]
        masks, losses, ces, recons = [], [], [], []
        with torch.no_grad():
            for _ in range(count):
                mask = []
                for position, layer in enumerate(layers):
                    p = probabilities[position]
                    m = (torch.rand(p.shape, generator=generator) < p).float()
                    short = layer.top_k - int(m.sum())
                    if short > 0:
                        candidates = torch.argsort(p.masked_fill(m.bool(), -1.0), descending=True)[:short]
                        m[candidates] = 1.0
                    mask.append(m)
                    gates[position] = m
                ce, recon = DiEPCriterion._loss(model, batch, target, device)
                masks.append(mask)
                ces.append(ce.float().cpu())
                recons.append(recon.float().cpu())
                losses.append(ces[-1] + opts["recon_weight"] * recons[-1])
        total = torch.stack(losses)
        advantage = total - (total.sum() - total) / (count - 1)
        for position, location in enumerate(theta):
            grad = sum(advantage[i] * (masks[i][position] - probabilities[position]) for i in range(count)) / count
            location.grad = grad.to(location.dtype)
        zero = torch.zeros((), requires_grad=True)
        return torch.stack(ces).mean() + 0 * zero, torch.stack(recons).mean() + 0 * zero
