"""Speed and memory probes: what pruning buys at inference, measured the same way for base and pruned models.

Speed: prefill tokens/s (one forward over a prompt batch) and decode tokens/s (greedy steps with the KV cache),
median of ``repeats`` runs after a warm-up. Memory: bytes held by parameters and buffers (total and routed
experts) and the peak during one forward (CUDA allocator peak on GPU, sampled process RSS on CPU), read by
:class:`diep_hub.memory.PeakMemory`, the meter the pruning report uses too.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch
from torch import nn

from ..criteria.capture import input_device
from ..errors import ConfigError
from ..memory import PeakMemory

logger = logging.getLogger(__name__)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt(model: nn.Module, batch_size: int, prompt_len: int, seed: int, device) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 32))
    generator = torch.Generator().manual_seed(seed)
    low = 3 if vocab > 8 else 0  # keep clear of pad/bos/eos in small vocabularies
    return torch.randint(low, vocab, (batch_size, prompt_len), generator=generator).to(device)


@torch.inference_mode()
def measure_speed(
    model: nn.Module,
    *,
    batch_size: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Prefill and decode throughput in tokens/s (median over ``repeats`` after one warm-up run)."""
    for name, value in (("batch_size", batch_size), ("prompt_len", prompt_len), ("new_tokens", new_tokens),
                        ("repeats", repeats)):
        _positive_int(name, value)
    device = input_device(model)
    ids = _prompt(model, batch_size, prompt_len, seed, device)
    was_training = model.training
    model.eval()
    prefill_times, decode_times = [], []
    try:
        for run in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            _sync(device)
            prefill = time.perf_counter() - start
            past = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            decode = time.perf_counter() - start
            if run:  # run 0 warms caches and kernels
                prefill_times.append(prefill)
                decode_times.append(decode)
    finally:
        model.train(was_training)
    prefill_s = statistics.median(prefill_times)
    decode_s = statistics.median(decode_times)
    return {
        "prefill_tokens_per_s": batch_size * prompt_len / prefill_s,
        "decode_tokens_per_s": batch_size * new_tokens / decode_s,
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "device": str(device),
    }


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers, and of routed-expert weights alone (what pruning removes)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    expert = 0
    try:
        from ..families import get_family

        for layer in get_family(model).moe_layers(model):
            expert += sum(p.numel() * p.element_size() for p in layer.experts.parameters())
    except Exception as exc:  # noqa: BLE001 - a non-MoE model simply has no routed experts to count
        logger.debug("no routed experts counted: %s", exc)
    return {
        "parameter_bytes": int(params),
        "buffer_bytes": int(buffers),
        "routed_expert_bytes": int(expert),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
    }


@torch.inference_mode()
def measure_memory(model: nn.Module, *, batch_size: int = 1, seq_len: int = 128, seed: int = 0) -> dict[str, Any]:
    """Parameter bytes plus the peak memory of one forward over ``batch_size`` x ``seq_len`` tokens."""
    _positive_int("batch_size", batch_size)
    _positive_int("seq_len", seq_len)
    device = input_device(model)
    ids = _prompt(model, batch_size, seq_len, seed, device)
    with PeakMemory(device) as peak:
        model(input_ids=ids, use_cache=False)
    result: dict[str, Any] = parameter_bytes(model)
    result.update(
        peak_bytes=int(peak.peak_bytes),
        peak_increase_bytes=int(max(peak.peak_bytes - peak.start_bytes, 0)),
        peak_method="torch.cuda.max_memory_allocated" if device.type == "cuda" else "process RSS, sampled",
        batch_size=batch_size,
        seq_len=seq_len,
        device=str(device),
    )
    return result
