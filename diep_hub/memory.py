"""Peak memory of a block of work, for the pruning report, the evaluation memory probe and the search-cost
benchmark.

On GPU the CUDA allocator keeps its own peak. On CPU the process RSS overstates what a stage needs (the allocator
keeps freed pages), so we also sample the bytes live in malloc (glibc ``mallinfo2``: in-use heap plus mmapped
blocks), through which torch allocates CPU tensors; that peak repeats from run to run.
"""

from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Callable
from typing import Any

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]


def _live_heap_reader() -> Callable[[], int] | None:
    """A function returning live malloc bytes, or None off glibc (macOS, musl), where only RSS is reported."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def live() -> int:
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return live


live_heap_bytes = _live_heap_reader()


class PeakMemory:
    """Peak memory during a ``with`` block: RSS and live malloc bytes sampled by a thread, CUDA's own peak.

    The one meter for the pruning report, the evaluation memory probe and the search-cost benchmark. ``device``
    names the CUDA device whose allocator peak is read (default: the current one when CUDA is available); a CPU
    device reads no CUDA figures. Call :meth:`measure` at stage boundaries as well, so that a stage shorter than
    the sampling interval is seen.
    """

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.005):
        self.interval = interval
        self._stop = threading.Event()
        self.start_rss = self.peak_rss = 0
        self.start_heap = self.peak_heap = 0
        self.start_cuda = self.peak_cuda = 0
        if device is None:
            self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        else:
            self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def __enter__(self) -> PeakMemory:
        import psutil

        # Collect garbage first: objects freed by a later collection would otherwise lower the heap below the
        # baseline and hide the block's own allocations.
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_cuda = self.peak_cuda = torch.cuda.memory_allocated(self.device)
        self._process = psutil.Process()
        self.start_rss = self.peak_rss = self._process.memory_info().rss
        if live_heap_bytes is not None:
            self.start_heap = self.peak_heap = live_heap_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def measure(self) -> None:
        """Sample now."""
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
        if live_heap_bytes is not None:
            self.peak_heap = max(self.peak_heap, live_heap_bytes())

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.measure()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.measure()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_cuda = torch.cuda.max_memory_allocated(self.device)

    @property
    def start_bytes(self) -> int:
        """Memory at the start on the measured device: CUDA allocated bytes on a CUDA device, else process RSS."""
        return int(self.start_cuda if self.cuda else self.start_rss)

    @property
    def peak_bytes(self) -> int:
        """Peak on the measured device: CUDA's ``max_memory_allocated`` on a CUDA device, else sampled RSS."""
        return int(self.peak_cuda if self.cuda else self.peak_rss)

    @property
    def heap_increase(self) -> int | None:
        """Peak live malloc bytes above the start, or None where they cannot be read."""
        return None if live_heap_bytes is None else int(self.peak_heap - self.start_heap)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cpu_rss_start_bytes": int(self.start_rss),
            "cpu_rss_peak_bytes": int(self.peak_rss),
            "cpu_rss_increase_bytes": int(self.peak_rss - self.start_rss),
            "method": f"process RSS and live malloc bytes sampled every {self.interval * 1000:.0f} ms",
        }
        if self.heap_increase is not None:
            out["cpu_heap_peak_increase_bytes"] = self.heap_increase
        if self.cuda:
            out["cuda_max_memory_allocated_bytes"] = int(self.peak_cuda)
        return out
