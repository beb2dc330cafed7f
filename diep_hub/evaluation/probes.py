"""Speed and memory probes: what pruning buys at inference, measured the same way for base and pruned models.

Speed: prefill tokens/s (one forward over a prompt batch) and decode tokens/s (greedy steps with the KV cache),
median of ``repeats`` runs after a warm-up. Memory: bytes held by the weights (parameters, total and routed
experts: what the safetensors files hold), and the peak of what one forward adds on top of them, isolated from the
rest of the process: on GPU the CUDA allocator's peak above the bytes allocated before the forward; on CPU the
bytes live in malloc (through which torch allocates CPU tensors) read after every aten op of the forward
(:class:`ForwardMemoryMeter`), above the bytes live before it. The process RSS is not reported: it counts the
Python process (libraries, caches, freed pages kept by the allocator), not the model.
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
from ..memory import PeakMemory, live_heap_bytes

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
            past = out.cache  # transformers 5: `cache` (in and out), past_key_values is deprecated
            token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, cache=past, use_cache=True)
                past = out.cache
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


CUDA_METHOD = "torch.cuda.max_memory_allocated during the forward, above the bytes allocated before it"


class ForwardMemoryMeter:
    """Peak bytes live in malloc above the start, read after every aten op run inside the ``with`` block (a
    ``TorchDispatchMode``): CPU tensors an op creates are counted when it returns, whatever their lifetime, so the
    peak does not depend on a sampling interval. ``peak_increase`` is None where malloc cannot be read (not glibc)."""

    METHOD = "bytes live in malloc, read after every aten op of the forward, above those live before it"

    def __init__(self):
        self.start = self.peak = 0
        self._mode = None

    def __enter__(self) -> ForwardMemoryMeter:
        import gc

        from torch.utils._python_dispatch import TorchDispatchMode

        meter = self

        class _AfterEveryOp(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                meter.peak = max(meter.peak, live_heap_bytes())
                return out

        gc.collect()  # objects freed by a later collection would lower the heap below the start
        self.start = self.peak = live_heap_bytes() if live_heap_bytes is not None else 0
        if live_heap_bytes is not None:
            self._mode = _AfterEveryOp()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None

    @property
    def peak_increase(self) -> int | None:
        return None if live_heap_bytes is None else int(self.peak - self.start)


@torch.inference_mode()
def forward_peak(model: nn.Module, ids: torch.Tensor) -> tuple[int | None, int | None, str | None]:
    """(bytes one forward adds at its peak, peak bytes including the weights where the allocator knows them, how
    they were read) for ``model(ids)``; a warm-up forward first, so that one-time allocations are not counted."""
    device = ids.device
    if device.type == "cuda":
        model(input_ids=ids, use_cache=False)
        with PeakMemory(device) as peak:
            model(input_ids=ids, use_cache=False)
        increase = int(max(peak.peak_bytes - peak.start_bytes, 0))
        return increase, int(peak.peak_bytes), CUDA_METHOD
    if live_heap_bytes is None:
        return None, None, None
    with ForwardMemoryMeter():  # warm-up, the dispatch machinery included
        model(input_ids=ids, use_cache=False)
    with ForwardMemoryMeter() as meter:
        model(input_ids=ids, use_cache=False)
    return meter.peak_increase, None, ForwardMemoryMeter.METHOD


@torch.inference_mode()
def measure_memory(model: nn.Module, *, batch_size: int = 1, seq_len: int = 128, seed: int = 0) -> dict[str, Any]:
    """Weight bytes (parameters, routed experts) and the peak memory one forward over ``batch_size`` x ``seq_len``
    tokens adds to them (:func:`forward_peak`); on GPU also the allocator's peak including the weights."""
    _positive_int("batch_size", batch_size)
    _positive_int("seq_len", seq_len)
    device = input_device(model)
    ids = _prompt(model, batch_size, seq_len, seed, device)
    increase, peak, method = forward_peak(model, ids)
    result: dict[str, Any] = parameter_bytes(model)
    result.update(
        forward_peak_bytes=increase,
        peak_bytes=peak,
        peak_method=method,
        batch_size=batch_size,
        seq_len=seq_len,
        device=str(device),
    )
    return result
