"""Removal-aware DiEP: learn which experts to keep while the model runs with experts removed.

The paper's search (``criteria/diep.py``) scales expert outputs and never shows the model an expert removed, so
it cannot learn what a removal costs (benchmarks/RESULTS.md). This search moves the learned variable to where
surgery acts: the router. Each routed expert e of MoE layer l has a keep gate z in [0, 1]; log z is added to the
expert's router logit before the router's own activation, grouping, top-k and renormalisation. At z = 1 the
layer is the unpruned one; at z = 0 the expert's tokens go to the experts that would take them after surgery
(exactly so for softmax routers, where a -inf logit is the same as deleting the router row).

Gates (per step, for every expert of every layer): hard-concrete samples (Louizos et al. 2018, "Learning Sparse
Neural Networks through L0 Regularization", https://arxiv.org/abs/1712.01312) with location theta:
    s = sigmoid((log u - log(1 - u) + theta) / b),  u ~ U(0, 1),  z = clamp(s * (zeta - gamma) + gamma, 0, 1)
with b = 2/3, gamma = -0.1, zeta = 1.1. A share of the samples is exactly 0 (the expert removed for that step),
a share exactly 1, the rest in between carries the gradient. P(z > 0) = sigmoid(theta - b log(-gamma / zeta)).

Loss per step: next-token CE + recon_weight * || F'(x) - F(x) ||_F (DiEP's Eq. 7 with the same reconstruction
target, the unpruned last hidden state) + budget_weight * ((E[kept] - K) / K)^2, where E[kept] is the sum of
P(z > 0) over ALL experts of all layers and K the experts kept at the target sparsity. The budget is global, so
the allocation across layers is learned jointly: the search spends the removals where they cost least.

Start: theta is initialised from soft frequency (or another cheap criterion, option ``init``) so that the
sampled models already have about the target sparsity at step 0, rather than at the trained model's stationary
point where the paper's gated search barely moves. Scores: P(z > 0) after the search, one global ranking.

Needs the target sparsity (``ScoringContext.sparsity``): the budget depends on it, so scores are per sparsity.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..families import MoELayer
from .base import Criterion, ScoreResult, ScoringContext, get_criterion, register_criterion
from .capture import criterion_options, eval_mode, input_device
from .diep import DiEPCriterion, checkpointing_mode, cosine_lr, frozen_weights

logger = logging.getLogger(__name__)

#: hard-concrete stretch and temperature (Louizos et al. 2018)
GAMMA, ZETA, TEMPERATURE = -0.1, 1.1, 2.0 / 3.0
#: log of the smallest gate value used as a router bias: a gate of 0 adds about -27.6 to the logit (e^-27.6 ~ 1e-12)
MIN_LOG_GATE = math.log(1e-12)
INITS = ("soft_frequency", "reap", "frequency", "uniform")

DEFAULT_OPTIONS: dict[str, Any] = {
    "epochs": 5,
    "lr": 0.1,
    "recon_weight": 0.01,
    "budget_weight": 10.0,
    "init": "soft_frequency",
    "init_spread": 2.0,
    "estimator": "reinforce",
    "masks": 4,
    "progress": True,
}
ESTIMATORS = ("reinforce", "concrete")


def validate_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled, every option checked; ConfigError names the field and what is allowed."""
    opts = criterion_options("diep_removal", options, DEFAULT_OPTIONS)
    for name in ("lr", "init_spread"):
        value = opts[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name}={value!r} must be a finite number > 0")
    for name in ("recon_weight", "budget_weight"):
        value = opts[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name}={value!r} must be a finite number >= 0")
    epochs = opts["epochs"]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r} must be an integer >= 1")
    masks = opts["masks"]
    if isinstance(masks, bool) or not isinstance(masks, int) or masks < 2:
        raise ConfigError(f"masks={masks!r} must be an integer >= 2")
    if opts["estimator"] not in ESTIMATORS:
        raise ConfigError(f"estimator={opts['estimator']!r} is not allowed; choose one of {list(ESTIMATORS)}")
    if opts["init"] not in INITS:
        raise ConfigError(f"init={opts['init']!r} is not allowed; choose one of {list(INITS)}")
    return opts


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


@contextmanager
def router_logit_bias(layers: list[MoELayer], bias: Callable[[int], torch.Tensor]) -> Iterator[None]:
    """Add ``bias(position)`` ([num_experts]) to each layer's router logits, before activation, grouping, top-k and
    renormalisation, for every forward inside the block.

    The router's own code does the routing: it is run on [hidden, 1] with its weight extended by a bias column
    (``torch.func.functional_call``, so the bias keeps its gradient and no parameter is replaced). Every family's
    router computes its logits as a linear map of the hidden states, which this relies on; ``check_router_bias``
    verifies it before a search.
    """
    handles = []
    for position, layer in enumerate(layers):
        selection_only = [n for n in layer.family.router_expert_tensors if n not in ("weight", "bias")]
        hook = _biased_router_hook(position, bias, selection_only)
        handles.append(layer.router.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _biased_router_hook(position: int, bias: Callable[[int], torch.Tensor], selection_only: list[str]):
    """``selection_only`` names per-expert router tensors that steer the choice but not the weights (DeepSeek-V3's
    ``e_score_correction_bias``): a removed expert (bias at ``MIN_LOG_GATE``) gets -1e4 there too, so a sigmoid
    score of 0 plus a large correction can never pick it, as after surgery."""
    busy = {"flag": False}

    def hook(router: nn.Module, args: tuple, _output):
        if busy["flag"]:
            return None
        hidden = args[0]
        weight = router.weight
        column = bias(position).to(device=weight.device, dtype=weight.dtype)
        replaced = {"weight": torch.cat([weight, column[:, None]], dim=1)}
        removed = (column.detach() <= MIN_LOG_GATE + 1e-3).to(weight.dtype)
        for name in selection_only:
            tensor = getattr(router, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 1:
                replaced[name] = tensor - 1e4 * removed.to(tensor.device, tensor.dtype)
        extended_hidden = torch.cat([hidden, hidden.new_ones(*hidden.shape[:-1], 1)], dim=-1)
        saved_dim = getattr(router, "hidden_dim", None)
        busy["flag"] = True
        try:
            if saved_dim is not None:
                router.hidden_dim = saved_dim + 1
            return torch.func.functional_call(router, replaced, (extended_hidden,))
        finally:
            busy["flag"] = False
            if saved_dim is not None:
                router.hidden_dim = saved_dim

    return hook


def check_router_bias(layer: MoELayer, hidden_size: int) -> None:
    """Refuse a router the bias cannot be added to: zero bias must route as the plain router does, and a large
    negative bias on an expert must keep every token away from it."""
    router = layer.router
    weight = router.weight
    hidden = torch.randn(32, hidden_size, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with torch.no_grad():
        plain = router(hidden)
        zero = torch.zeros(layer.num_experts)
        with router_logit_bias([layer], lambda _p: zero):
            same = router(hidden)
        banned = int(plain[2].reshape(-1)[0])
        ban = torch.zeros(layer.num_experts)
        ban[banned] = MIN_LOG_GATE
        with router_logit_bias([layer], lambda _p: ban):
            moved = router(hidden)
    problem = None
    if not torch.equal(plain[2].sort(dim=-1).values, same[2].sort(dim=-1).values):
        problem = "a zero bias changed the experts chosen"
    elif (moved[2] == banned).any():
        problem = f"a bias of {MIN_LOG_GATE:.1f} on expert {banned} did not keep tokens away from it"
    if problem is not None:
        raise ConfigError(
            f"the removal-aware search cannot bias the router of layer {layer.index} ({type(router).__name__}): "
            f"{problem}; use method='diep' with search_mode='gated' or 'dense', or another criterion"
        )


def initial_theta(context: ScoringContext, init: str, spread: float, kept_target: int) -> dict[int, torch.Tensor]:
    """Gate locations whose keep probabilities follow a cheap criterion and sum to the kept target.

    The criterion's per-layer scores are made comparable across layers as log(score * N_l / sum(score)) (0 for an
    expert used as often as the layer's average), standardised over all experts, and mapped through
    sigmoid(spread * u + c) with c found by bisection so that the probabilities sum to ``kept_target``.
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
    low, high = -30.0, 30.0
    for _ in range(80):
        mid = (low + high) / 2
        if torch.sigmoid(spread * u + mid).sum().item() > kept_target:
            high = mid
        else:
            low = mid
    probability = torch.sigmoid(spread * u + (low + high) / 2).clamp(1e-4, 1 - 1e-4)
    theta = theta_for_probability(probability)
    out, start = {}, 0
    for layer in layers:
        out[layer.index] = theta[start : start + layer.num_experts].clone()
        start += layer.num_experts
    return out


@register_criterion
class RemovalAwareCriterion(Criterion):
    """Keep gates on the router, trained under a global budget of kept experts: see the module docstring."""

    name = "diep_removal"
    reference = "https://arxiv.org/abs/2509.16105"
    needs_sparsity = True

    def score(self, context: ScoringContext) -> ScoreResult:
        opts = validate_options(context.options)
        model, layers, input_ids = context.model, context.layers, context.input_ids
        if not layers:
            raise ConfigError("the model has no MoE layers to search")
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

        theta0 = initial_theta(context, opts["init"], float(opts["init_spread"]), kept_target)
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
                        budget = ((expected - kept_target) / kept_target) ** 2
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
