"""Peak memory of a block of work, for the report's and benchmarks' cost columns.

Peak memory is the largest amount *above the level at the block's start*:

- on CUDA, ``torch.cuda.max_memory_allocated`` (tensors only, exact);
- on CPU, the process's resident set size (RSS) sampled every ``interval`` seconds by a thread
  (``psutil``), so short spikes can be missed. Before the baseline is read, garbage from earlier work
  is collected (``gc.collect``) and, on glibc, freed heap pages are returned to the system
  (``malloc_trim``): otherwise a collection during the block would lower the RSS below the baseline,
  and memory the allocator kept from an earlier estimator would be reused without being counted.

:func:`~lightning_fimoda.attribute.run_estimators` uses it per estimator (``measure_memory=True``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading

import psutil
import torch

__all__ = ["PeakMemory", "memory_kind"]


class PeakMemory:
    """Context manager measuring peak memory above the starting level on ``device``; see the module doc.

    After the block, :attr:`peak_bytes` holds the result and :attr:`kind` says how it was measured.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.kind = memory_kind(self.device)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            gc.collect()
            _return_free_heap()
            self._process = psutil.Process()
            self._start = self._process.memory_info().rss
            self._max = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, self._process.memory_info().rss)
        self.peak_bytes = max(0, int(peak - self._start))


def _return_free_heap() -> None:
    """Ask glibc to give freed heap pages back to the system (no-op with other C libraries)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def memory_kind(device: torch.device) -> str:
    """How :class:`PeakMemory` measures on ``device`` (a sentence for reports)."""
    if device.type == "cuda":
        return "CUDA max_memory_allocated above the level at the estimator's start"
    return "CPU peak resident set size (psutil, sampled every 2 ms) above the level at the estimator's start"
