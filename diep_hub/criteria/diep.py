"""DiEP: learn how much each expert and each MoE layer matters, by gradient descent (arXiv 2509.16105).

Bai et al., "DiEP: Adaptive Mixture-of-Experts Compression through Differentiable Expert Pruning", NeurIPS 2025,
https://arxiv.org/abs/2509.16105. No official code exists; the decisions taken where the paper is silent are in
shared/docs/diep-method.md.

Parameters (model weights frozen, only these train; about 0.01% of the model):
    alpha^(l) in R^{N_l}   one logit per routed expert of MoE layer l, initialised to 0;
    beta^(l) = exp(b^(l))  one positive scale per layer, b initialised to 0 so beta = 1 exactly.

Search-time MoE output (``DiEPOptions.mode``, ``diep_hub.options``):
    "dense" (paper Eq. 5)  y = beta^(l) * sum_{i=1..N_l} softmax(alpha^(l))_i * FFN_i(x), over ALL experts; the
                           router's choice is ignored (it still runs, its output is discarded). Shared experts and
                           the rest of the block are unchanged.
    "gated"                y = sum_{i in topk(x)} w_i(x) * N_l * softmax(alpha^(l))_i * beta^(l) * FFN_i(x): the
                           router's top-k and weights are kept; at alpha = 0, beta = 1 this IS the unmodified model.
    "auto" (default)       "gated" for families that renormalise the top-k routing weights (Mixtral, GPT-OSS,
                           GraniteMoE, PhiMoE, and Qwen/OLMoE/DeepSeek-V3 with ``norm_topk_prob``), "dense" for those
                           that do not; the report records the mode used.
Why "auto" (benchmarks/RESULTS.md and HELDOUT.md, four trained zoo models): gated search was far ahead of dense
on the Mixtral-type models (which renormalise) and dense search ahead on the OLMoE- and Qwen2-MoE-type models
(which do not). Gated also costs top-k instead of N expert evaluations a token (32x less on 256-expert layers).
Epochs stay at the paper's 10: 30 epochs helped one Mixtral-type model a lot and ruined the other (the gated search
starts at the trained model's stationary point, so its ranking is weak and noisy, and more steps amplify the
noise into layer allocations).
Both are applied by a forward pre-hook on the block's fused ``experts`` module that rewrites its
(hidden, top_k_index, top_k_weights) arguments, so they work for every family and experts backend, under
accelerate's dispatch hooks and under gradient checkpointing (the hook runs again in the recompute).

Loss (Eq. 7), per batch:
    L = CE(next token) + lambda * || F'(x; alpha, beta) - F(x) ||_F      (Frobenius norm, not squared)
F is the unpruned model's LAST HIDDEN STATE (the input of the LM head), cached on CPU from one pass of the
unmodified model before the search (no second model copy). We reconstruct hidden states rather than logits
because the cache is V/H times smaller (8x for Mixtral, ~37x for Qwen's 152k vocabulary: 128 x 2048 logits of
Mixtral would be 33 GB in float32), and the LM head is frozen and linear: the logit error is at most ||W_head||
times the hidden-state error, so matching hidden states matches logits (it also penalises directions the head
ignores, a conservative choice).

Optimisation: Adam (lr 5e-3), cosine decay over all steps, ``epochs`` passes over the calibration set in
batches of ``batch_size`` sequences (shuffled per epoch with the seed), alternating ``alpha_steps`` optimiser
steps on alpha (beta frozen) with ``beta_steps`` on beta (alpha frozen); the paper's ablation prefers 3:1.

Scores: ``ranking="softmax"`` (default, our decision): s_i^(l) = softmax(alpha^(l))_i * beta^(l), comparable
across layers because softmax ignores a per-layer shift of alpha; ``ranking="raw"``: alpha_i^(l) * beta^(l), as
written in the paper.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS
from torch import nn

from ..errors import ConfigError
from ..families import MoELayer
from ..options import DiEPOptions
from .base import Criterion, ScoreResult, ScoringContext, parse_options, register_criterion
from .capture import eval_mode, input_device

logger = logging.getLogger(__name__)

RANKINGS = {"softmax": "softmax(alpha)*beta", "raw": "alpha*beta"}


def resolve_mode(mode: str, layer: MoELayer, config) -> str:
    """The search mode actually run: "auto" becomes "gated" where the family renormalises the top-k routing
    weights and "dense" where it does not (the benchmark's finding, see the module docstring)."""
    if mode != "auto":
        return mode
    return "gated" if layer.family.renormalizes(config) else "dense"


def validate_search_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The search settings from ``ScoringContext.options`` (the fields of :class:`~diep_hub.options.DiEPOptions`
    plus ``progress``), checked by that model; raises ConfigError naming the field and what is allowed.

    Returns the names the search below uses (``recon_weight`` = lambda, ``alpha_steps``/``beta_steps`` =
    alternation).
    """
    opts, run = parse_options(DiEPCriterion, options, {"progress": True})
    return {
        "mode": opts.mode,
        "lr": opts.lr,
        "epochs": opts.epochs,
        "recon_weight": opts.lambda_,
        "alpha_steps": opts.alternation[0],
        "beta_steps": opts.alternation[1],
        "ranking": opts.ranking,
        "progress": run["progress"],
    }


class SearchParameters(nn.Module):
    """alpha (one vector a layer) and log-beta (one scalar a layer), kept on CPU: they are tiny, and the hooks
    move the per-layer scale to wherever the experts run (GPU, CPU, accelerate-offloaded)."""

    def __init__(self, layers: list[MoELayer]):
        super().__init__()
        self.layer_indices = [layer.index for layer in layers]
        self.alpha = nn.ParameterList([nn.Parameter(torch.zeros(layer.num_experts)) for layer in layers])
        self.log_beta = nn.ParameterList([nn.Parameter(torch.zeros(())) for _ in layers])

    def beta(self, position: int) -> torch.Tensor:
        return self.log_beta[position].exp()

    def mixture(self, position: int) -> torch.Tensor:
        """beta * softmax(alpha): the per-expert weight of the dense mixture (Eq. 5)."""
        return self.beta(position) * torch.softmax(self.alpha[position], dim=0)


def _experts_pre_hook(params: SearchParameters, position: int, mode: str):
    """A pre-hook for ``experts(hidden, top_k_index, top_k_weights)`` that applies the search-time mixture."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args) + [kwargs.pop(name) for name in names[len(args) :] if name in kwargs]
        hidden, index, weights = values[:3]
        mixture = params.mixture(position)
        num_experts = mixture.shape[0]
        if mode == "dense":
            tokens = hidden.shape[0]
            index = torch.arange(num_experts, device=index.device).expand(tokens, num_experts)
            weights = mixture.to(device=weights.device, dtype=weights.dtype).expand(tokens, num_experts)
        else:
            scale = (mixture * num_experts).to(device=weights.device, dtype=weights.dtype)
            # A sentinel index num_experts (used by skipping to mean "no expert") keeps weight 0 * 1.
            scale = torch.cat([scale, scale.new_ones(1)])
            weights = weights * scale[index.clamp(max=num_experts)]
        return (hidden, index, weights, *values[3:]), kwargs

    return hook


@contextmanager
def search_hooks(params: SearchParameters, layers: list[MoELayer], mode: str) -> Iterator[None]:
    """Install the search-time pre-hooks on every layer's experts; removed on exit, whatever happens."""
    handles = [
        layer.experts.register_forward_pre_hook(_experts_pre_hook(params, pos, mode), with_kwargs=True)
        for pos, layer in enumerate(layers)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """requires_grad=False on every model parameter for the search, restored afterwards."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextmanager
def checkpointing_mode(model: nn.Module) -> Iterator[None]:
    """Let gradient checkpointing act on a model in eval mode.

    transformers checkpoints a decoder layer only when ``layer.gradient_checkpointing and layer.training``; we
    set ``training`` on those layer objects alone (not their children, so dropout and jitter stay off), and make
    the embeddings' output require grad so that reentrant checkpointing also passes gradients to alpha and beta.
    """
    flipped = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True and m is not model]
    for m in flipped:
        m.training = True
    handle = None
    if flipped and hasattr(model, "get_input_embeddings"):
        handle = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for m in flipped:
            m.training = False


@contextmanager
def capture_head_input(model: nn.Module, store: list) -> Iterator[None]:
    """Record the input of the LM head (the last hidden state after the final norm) on each forward."""
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no output embeddings (LM head); DiEP needs a causal LM")
    handle = head.register_forward_pre_hook(lambda _m, args: store.append(args[0]))
    try:
        yield
    finally:
        handle.remove()


def _next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    shift_logits = logits[:, :-1, :].float()
    shift_labels = input_ids[:, 1:].to(shift_logits.device)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1))


def check_search_inputs(layers: list[MoELayer], input_ids: torch.Tensor) -> None:
    """What every gradient search needs: MoE layers to search and [num_samples, seq_len >= 2] tokens (the
    next-token loss needs two positions)."""
    if not layers:
        raise ConfigError("the model has no MoE layers to search")
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ConfigError(f"input_ids must be [num_samples, seq_len >= 2], got shape {tuple(input_ids.shape)}")


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from base_lr (step 0) towards 0 (after the last step)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def alternation(step: int, alpha_steps: int, beta_steps: int) -> str:
    """Which parameter group the ``step``-th optimiser step updates: alpha_steps of alpha, then beta_steps of beta."""
    return "alpha" if step % (alpha_steps + beta_steps) < alpha_steps else "beta"


@register_criterion
class DiEPCriterion(Criterion):
    """Differentiable Expert Pruning: alpha/beta search, see the module docstring for formulas and options."""

    name = "diep"
    reference = "https://arxiv.org/abs/2509.16105"
    options = DiEPOptions

    def score(self, context: ScoringContext) -> ScoreResult:
        opts = validate_search_options(context.options)
        model, layers, input_ids = context.model, context.layers, context.input_ids
        check_search_inputs(layers, input_ids)
        batch_size = int(context.batch_size)
        num_samples = input_ids.shape[0]
        steps_per_epoch = math.ceil(num_samples / batch_size)
        total_steps = steps_per_epoch * opts["epochs"]
        device = input_device(model)
        batches = list(torch.split(torch.arange(num_samples), batch_size))
        mode = resolve_mode(opts["mode"], layers[0], model.config)

        with frozen_weights(model), eval_mode(model):
            targets = self._reference_outputs(model, input_ids, batches, device, opts["progress"])
            params = SearchParameters(layers)
            opt_alpha = torch.optim.Adam(params.alpha.parameters(), lr=opts["lr"])
            opt_beta = torch.optim.Adam(params.log_beta.parameters(), lr=opts["lr"])
            generator = torch.Generator().manual_seed(int(context.seed))
            curve: list[dict[str, float]] = []
            schedule: list[str] = []
            step = 0
            bar = tqdm(total=total_steps, desc=f"DiEP search ({mode})", disable=not opts["progress"])
            with search_hooks(params, layers, mode), checkpointing_mode(model):
                for _epoch in range(opts["epochs"]):
                    order = torch.randperm(num_samples, generator=generator)
                    for rows in torch.split(order, batch_size):
                        group = alternation(step, opts["alpha_steps"], opts["beta_steps"])
                        optimiser = opt_alpha if group == "alpha" else opt_beta
                        for param_group in optimiser.param_groups:
                            param_group["lr"] = cosine_lr(opts["lr"], step, total_steps)
                        opt_alpha.zero_grad(set_to_none=True)
                        opt_beta.zero_grad(set_to_none=True)
                        ce, recon = self._loss(model, input_ids[rows], targets[rows], device)
                        total = ce + opts["recon_weight"] * recon
                        total.backward()
                        optimiser.step()
                        schedule.append(group)
                        curve.append({"total": total.item(), "ce": ce.item(), "recon": recon.item()})
                        bar.update(1)
                        bar.set_postfix(loss=f"{curve[-1]['total']:.4f}", group=group)
                        step += 1
            bar.close()

        scores, alphas, betas = {}, {}, {}
        with torch.no_grad():
            for pos, index in enumerate(params.layer_indices):
                alpha = params.alpha[pos].detach().float()
                beta = params.beta(pos).detach().float()
                ranked = torch.softmax(alpha, dim=0) * beta if opts["ranking"] == "softmax" else alpha * beta
                scores[index] = ranked.cpu().contiguous()
                alphas[str(index)] = alpha.tolist()
                betas[str(index)] = float(beta)
        details = {
            "mode": mode,
            "requested_mode": opts["mode"],
            "alpha": alphas,
            "beta": betas,
            "loss_curve": curve,
            "alpha_optimizer_steps": _optimizer_steps(opt_alpha),
            "beta_optimizer_steps": _optimizer_steps(opt_beta),
            "schedule": "".join("a" if g == "alpha" else "b" for g in schedule),
            "hyperparameters": {
                "lr": opts["lr"],
                "epochs": opts["epochs"],
                "batch_size": batch_size,
                "recon_weight": opts["recon_weight"],
                "alpha_steps": opts["alpha_steps"],
                "beta_steps": opts["beta_steps"],
                "lr_schedule": "cosine",
                "optimizer": "Adam",
                "reconstruction_target": "last hidden state (LM head input)",
                "num_samples": num_samples,
                "seq_len": int(input_ids.shape[1]),
                "seed": int(context.seed),
            },
        }
        logger.info(
            "DiEP search (%s): %d steps (%d alpha, %d beta), loss %.4f -> %.4f",
            mode,
            total_steps,
            details["alpha_optimizer_steps"],
            details["beta_optimizer_steps"],
            curve[0]["total"],
            curve[-1]["total"],
        )
        return ScoreResult(scores=scores, ranking=RANKINGS[opts["ranking"]], details=details)

    @staticmethod
    def _reference_outputs(model, input_ids, batches, device, progress: bool) -> torch.Tensor:
        """F(x): the unmodified model's last hidden states for every calibration sequence, cached on CPU."""
        chunks = []
        with torch.no_grad():
            for rows in tqdm(batches, desc="DiEP reference pass", disable=not progress):
                store: list[torch.Tensor] = []
                with capture_head_input(model, store):
                    model(input_ids=input_ids[rows].to(device), use_cache=False)
                chunks.append(store[-1].detach().to("cpu"))
        return torch.cat(chunks)

    @staticmethod
    def _loss(model, batch, target, device) -> tuple[torch.Tensor, torch.Tensor]:
        store: list[torch.Tensor] = []
        with capture_head_input(model, store):
            logits = model(input_ids=batch.to(device), use_cache=False).logits
        hidden = store[-1]
        ce = _next_token_ce(logits, batch)
        recon = torch.linalg.vector_norm((hidden.float() - target.to(hidden.device).float()).reshape(-1))
        return ce, recon.to(ce.device)


def _optimizer_steps(optimiser: torch.optim.Optimizer) -> int:
    """Steps the optimiser really took, read from Adam's own per-parameter state."""
    for group in optimiser.param_groups:
        for p in group["params"]:
            state = optimiser.state.get(p)
            if state and "step" in state:
                return int(state["step"])
    return 0
