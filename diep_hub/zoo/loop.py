# Copyright 2026 the diep_hub authors. Apache-2.0.
"""The training loop shared by the zoo models and the README's tiny model.

Both are trained from scratch on generated text and cached by a key that hashes this module's source with the
caller's (zoo/train.py, tiny.py): a change here retrains both, a change to how either makes its batches retrains
that one. Determinism is the point: ``reproduce`` rebuilds the same weights on any machine with the same torch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def deterministic_training(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads and deterministic algorithms, then restore both.

    CPU reductions depend on the thread count, so the count is part of what decides the weights."""
    previous_threads = torch.get_num_threads()
    previous_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_det)


def lr_factor(step: int, *, warmup: int, steps: int) -> float:
    """Linear warmup, then cosine decay to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def optimise(
    model: torch.nn.Module,
    batch_at: Callable[[int], torch.LongTensor],
    *,
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    desc: str,
) -> list[dict]:
    """Next-token training of ``model`` for ``steps`` steps on ``batch_at(step)`` (AdamW, warmup + cosine, gradient
    norm clipped at 1, the router's auxiliary loss included); returns the loss every 50 steps and at the last."""
    from huggingface_hub.utils import tqdm

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup=warmup, steps=steps))
    log = []
    bar = tqdm(range(steps), desc=desc, leave=False)
    for step in bar:
        batch = batch_at(step)
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(out.loss.item(), 4)})
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
    model.eval()
    return log
