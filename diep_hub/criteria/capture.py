"""Watching MoE layers during calibration passes: what the baseline criteria (frequency, soft frequency, REAP,
NAEE) read off a model without changing it.

Two kinds of capture, both forward hooks removed on exit whatever happens, both under ``torch.no_grad``:

- ``routing_pass``: one pass over the calibration batches; after each layer's router runs, a callback receives a
  ``RoutingRecord`` (the router's input tokens, its logits over all experts, and the top-k ids and weights the
  block will use). Criteria accumulate statistics in the callback, so nothing is kept per token across batches.
- ``capture_block_inputs``: the hidden states entering ONE layer's MoE block for every calibration batch, with the
  forward stopped right after that block is reached (NAEE needs a layer's inputs, not the whole model's outputs;
  stopping early keeps memory at one layer's activations and saves the rest of the pass).

Routers in transformers 5 return ``(router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])`` and the
fused experts take exactly the router's input tokens (reshaped to [T, H]), so one hook point serves every family.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS
from torch import nn

from ..errors import ConfigError
from ..families import MoELayer
from .base import Criterion, ScoreResult, ScoringContext, parse_options

logger = logging.getLogger(__name__)


@dataclass
class RoutingRecord:
    """One batch seen by one MoE layer's router.

    Attributes:
        layer: the layer.
        hidden: router input tokens [T, H] (the tokens the experts receive).
        router_logits: [T, E] logits over all of the layer's experts (float32).
        top_k_index: [T, k] experts chosen for each token (a value >= E means "no expert", as skipping uses).
        top_k_weights: [T, k] the weights the block multiplies each chosen expert's output by.
    """

    layer: MoELayer
    hidden: torch.Tensor
    router_logits: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the embeddings' execution device (accelerate-dispatched models) or their weight's."""
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return device if isinstance(device, torch.device) else torch.device(device)
    weight_device = embeddings.weight.device
    return torch.device("cpu") if weight_device.type == "meta" else weight_device


def check_input_ids(input_ids: torch.Tensor, batch_size: int) -> None:
    """Calibration tokens must be a 2-D integer tensor and batch_size a positive integer: fail before any work."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ConfigError(f"input_ids must be a non-empty tensor [num_samples, seq_len], got {shape}")
    if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ConfigError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1")


def _batches(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(torch.split(input_ids, batch_size))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode while scoring (no router jitter, no dropout: the scored function is the served one), the previous
    mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _router_hook(layer: MoELayer, callback: Callable[[RoutingRecord], None]):
    def hook(_router: nn.Module, args: tuple, output) -> None:
        if not isinstance(output, tuple) or len(output) < 3:
            raise TypeError(
                f"layer {layer.index}: the router returned {type(output).__name__}, expected (logits, weights, index)"
            )
        logits, weights, index = output[0], output[1], output[2]
        hidden = args[0].reshape(-1, args[0].shape[-1])
        callback(
            RoutingRecord(
                layer=layer,
                hidden=hidden,
                router_logits=logits.reshape(hidden.shape[0], -1).float(),
                top_k_index=index.reshape(hidden.shape[0], -1),
                top_k_weights=weights.reshape(hidden.shape[0], -1),
            )
        )

    return hook


def routing_pass(
    model: nn.Module,
    layers: list[MoELayer],
    input_ids: torch.Tensor,
    batch_size: int,
    callback: Callable[[RoutingRecord], None],
    *,
    desc: str = "calibration pass",
    progress: bool = True,
) -> int:
    """Run the calibration batches through the model, calling ``callback`` for every (layer, batch).

    Returns:
        the number of tokens each layer saw.
    """
    check_input_ids(input_ids, batch_size)
    device = input_device(model)
    handles = [layer.router.register_forward_hook(_router_hook(layer, callback)) for layer in layers]
    try:
        with torch.no_grad(), eval_mode(model):
            for batch in tqdm(_batches(input_ids, batch_size), desc=desc, disable=not progress):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return int(input_ids.numel())


def expert_accumulators(context: ScoringContext) -> dict[int, torch.Tensor]:
    """A float64 zero per expert of each scored layer (layer index -> [E]): what the routing criteria sum into."""
    return {layer.index: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in context.layers}


def criterion_routing_pass(
    criterion: type[Criterion], context: ScoringContext, callback: Callable[[RoutingRecord], None], desc: str
) -> int:
    """``routing_pass`` over the context's calibration data for a criterion with no options of its own (only the
    run setting ``progress``; any other key is refused by ``parse_options`` before the pass). Returns the tokens."""
    _, run = parse_options(criterion, context.options, {"progress": True})
    return routing_pass(
        context.model,
        context.layers,
        context.input_ids,
        context.batch_size,
        callback,
        desc=desc,
        progress=run["progress"],
    )


class RoutingStatisticCriterion(Criterion):
    """A criterion that is a statistic of one routing pass (frequency, soft frequency, REAP): ``statistic`` gives
    the callback that accumulates it and the function that turns the sums into scores, so that several such
    criteria can share one pass over the same tokens (:func:`shared_routing_pass`; validated_choice does)."""

    #: the progress bar's label for this criterion's own pass
    pass_label: ClassVar[str]

    @abstractmethod
    def statistic(self, context: ScoringContext) -> tuple[Callable[[RoutingRecord], None],
                                                          Callable[[int], ScoreResult]]:
        """(the callback a routing pass calls for every (layer, batch), the scores from the tokens it saw)."""

    def score(self, context: ScoringContext) -> ScoreResult:
        accumulate, finish = self.statistic(context)
        return finish(criterion_routing_pass(type(self), context, accumulate, self.pass_label))


def shared_routing_pass(criteria: list[RoutingStatisticCriterion], context: ScoringContext, *,
                        progress: bool = False) -> list[ScoreResult]:
    """Each criterion's result from ONE routing pass over ``context.input_ids``: the same numbers as running them
    one after the other (every callback only reads the record), for the cost of one pass. Options other than
    ``progress`` are refused before the pass, as each criterion's own pass would."""
    for criterion in criteria:
        parse_options(type(criterion), context.options, {"progress": True})
    statistics = [criterion.statistic(context) for criterion in criteria]

    def accumulate(record: RoutingRecord) -> None:
        for callback, _ in statistics:
            callback(record)

    label = " + ".join(criterion.pass_label for criterion in criteria)
    tokens = routing_pass(context.model, context.layers, context.input_ids, context.batch_size, accumulate,
                          desc=label, progress=progress)
    return [finish(tokens) for _, finish in statistics]


class _StopForward(Exception):
    """Raised by a capture hook once the layer of interest has been reached: the rest of the pass is not needed."""


def capture_block_inputs(
    model: nn.Module,
    layer: MoELayer,
    input_ids: torch.Tensor,
    batch_size: int,
    *,
    offload: bool = True,
    progress: bool = True,
) -> list[torch.Tensor]:
    """The hidden states entering ``layer``'s MoE block, one tensor [B, S, H] per calibration batch.

    The forward pass is cut short once the block has been reached. With ``offload`` the captured states are
    moved to CPU (they are reused many times, for instance once per NAEE subset, and moved back per use).
    """
    check_input_ids(input_ids, batch_size)
    device = input_device(model)
    captured: list[torch.Tensor] = []

    def hook(_block: nn.Module, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs.get("hidden_states")
        captured.append(hidden.detach().to("cpu") if offload else hidden.detach())
        raise _StopForward

    handle = layer.block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), eval_mode(model):
            for batch in tqdm(
                _batches(input_ids, batch_size), desc=f"layer {layer.index} inputs", disable=not progress
            ):
                before = len(captured)
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
                if len(captured) != before + 1:
                    raise RuntimeError(f"layer {layer.index}: its MoE block did not run during the forward pass")
    finally:
        handle.remove()
    return captured


def block_output(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Run a MoE block on [B, S, H] inputs; GPT-OSS blocks return (hidden, router scores): keep the hidden part."""
    out = block(hidden)
    return out[0] if isinstance(out, tuple) else out


def weights_fingerprint(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, for tests and debug checks that a criterion changed nothing."""
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    state.update({f"buffer:{name}": b.detach().clone() for name, b in model.named_buffers()})
    return state


def criterion_options(criterion: str, options: dict | None, defaults: dict) -> dict:
    """Fill a criterion's option defaults; an unknown option is a ConfigError naming it and the allowed ones."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown {criterion} option(s) {unknown}; allowed: {sorted(defaults)}")
    return {**defaults, **options}
