"""A per-expert bias on a MoE router's logits: how the removal-aware search removes an expert without surgery.

``router_logit_bias`` adds ``bias(position)`` to every router's logits before its own activation, grouping, top-k
and renormalisation, by running the router's own code on [hidden, 1] with its weight extended by a bias column
(``torch.func.functional_call``: the bias keeps its gradient and no parameter is replaced). A bias of
``MIN_LOG_GATE`` removes the expert: for softmax routers a -inf logit is the same as deleting the router row, and
tests/test_removal_search.py compares it with surgery for every family. ``check_router_bias`` refuses a router this
cannot serve, before a search starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import ConfigError
from ..families import MoELayer

#: log of the smallest gate value used as a router bias: a gate of 0 adds about -27.6 to the logit (e^-27.6 ~ 1e-12)
MIN_LOG_GATE = math.log(1e-12)


def removal_bias(layers: list[MoELayer], keep: dict[int, list[int]]) -> list[torch.Tensor]:
    """The bias that removes what a keep map removes, per layer in ``layers`` order: 0 on the router logit of a
    kept expert, ``MIN_LOG_GATE`` on a removed one (pass ``lambda p: biases[p]`` to :func:`router_logit_bias`)."""
    biases = []
    for layer in layers:
        bias = torch.full((layer.num_experts,), MIN_LOG_GATE)
        bias[list(keep[layer.index])] = 0.0
        biases.append(bias)
    return biases


@contextmanager
def router_logit_bias(layers: list[MoELayer], bias: Callable[[int], torch.Tensor]) -> Iterator[None]:
    """Add ``bias(position)`` ([num_experts]) to each layer's router logits, before activation, grouping, top-k and
    renormalisation, for every forward inside the block.

    The router's own code does the routing: it is run on [hidden, 1] with its weight extended by a bias column
    (``torch.func.functional_call``, so the bias keeps its gradient and no parameter is replaced). Every family's
    router computes its logits as a linear map of the hidden states, which this relies on; ``check_router_bias``
    verifies it before a search. The router's ``forward`` is replaced within the block (not hooked), so the
    unbiased routing is never computed; an instance-level ``forward`` already there (accelerate's device hooks put
    one) does the computing and is put back afterwards.
    """
    routers = [layer.router for layer in layers]
    saved = [router.__dict__.get("forward") for router in routers]
    for position, (layer, router) in enumerate(zip(layers, routers)):
        selection_only = [n for n in layer.family.router_expert_tensors if n not in ("weight", "bias")]
        router.forward = _biased_forward(router, router.forward, position, bias, selection_only)
    try:
        yield
    finally:
        for router, forward in zip(routers, saved):
            del router.forward
            if forward is not None:
                router.forward = forward


def _biased_forward(router: nn.Module, plain_forward: Callable, position: int, bias: Callable[[int], torch.Tensor],
                    selection_only: list[str]) -> Callable:
    """The router's forward with the bias column: ``plain_forward`` (the router's own) runs on the extended hidden
    states under the extended weight. ``selection_only`` names per-expert router tensors that steer the choice but
    not the weights (DeepSeek-V3's ``e_score_correction_bias``): a removed expert (bias at ``MIN_LOG_GATE``) gets
    -1e4 there too, so a sigmoid score of 0 plus a large correction can never pick it, as after surgery."""
    busy = {"flag": False}

    def forward(hidden: torch.Tensor, *args, **kwargs):
        if busy["flag"]:  # the call from functional_call below: the plain routing of the extended inputs
            return plain_forward(hidden, *args, **kwargs)
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
            return torch.func.functional_call(router, replaced, (extended_hidden, *args), kwargs)
        finally:
            busy["flag"] = False
            if saved_dim is not None:
                router.hidden_dim = saved_dim

    return forward


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
