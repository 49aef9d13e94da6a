"""Timing and peak memory of each estimator, for the report's cost columns.

Peak memory is the largest amount *above the level at the estimator's start*:

- on CUDA, ``torch.cuda.max_memory_allocated`` (tensors only, exact);
- on CPU, the process's resident set size (RSS) sampled every ``interval`` seconds by a thread
  (``psutil``), so short spikes can be missed. Before the baseline is read, garbage from earlier work
  is collected (``gc.collect``) and, on glibc, freed heap pages are returned to the system
  (``malloc_trim``): otherwise a collection during the block would lower the RSS below the baseline,
  and memory the allocator kept from an earlier estimator would be reused without being counted.

Each estimator is fitted on its own fresh gradient cache by default, so its time and memory include
computing the per-sample gradients it needs (a fair cost comparison). ``share_gradients=True`` reuses
one cache, as :func:`~lightning_fimoda.attribute.run_estimators` does: faster, but then the first
estimator pays for every later one's gradients.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch import Tensor, nn

from ._data import model_device_dtype, resolve_indices
from .attribute import EstimatorRun, EstimatorSpec, build_estimators
from .functional import eval_mode
from .gradients import DEFAULT_MEMORY_BUDGET, GradientCache
from .task import AttributionTask

__all__ = ["PeakMemory", "ProfiledRun", "profile_estimators"]


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


@dataclass
class ProfiledRun(EstimatorRun):
    """An :class:`EstimatorRun` with the peak memory it needed (bytes; see :class:`PeakMemory`)."""

    peak_memory: int = 0


def profile_estimators(
    model: nn.Module,
    task: AttributionTask,
    train_dataset: Any,
    test_dataset: Any,
    estimators: EstimatorSpec | Sequence[EstimatorSpec],
    train_indices: Sequence[int] | Tensor | None = None,
    test_indices: Sequence[int] | Tensor | None = None,
    *,
    share_gradients: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> list[ProfiledRun]:
    """Fit and score each estimator in eval mode, recording wall time and peak memory per estimator."""
    built = build_estimators(estimators)
    train_idx = resolve_indices(train_dataset, train_indices, "training")
    test_idx = resolve_indices(test_dataset, test_indices, "test")
    device, _ = model_device_dtype(model)
    shared = GradientCache(memory_budget=memory_budget, progress=progress) if share_gradients else None
    runs = []
    with eval_mode(model):
        for est in built:
            cache = shared if shared is not None else GradientCache(memory_budget=memory_budget, progress=progress)
            with PeakMemory(device) as meter:
                start = time.perf_counter()
                est.fit(model, task, train_dataset, train_idx, cache=cache)
                scores = est.score(test_dataset, test_idx)
                seconds = time.perf_counter() - start
            runs.append(ProfiledRun(est.label, scores, seconds, est.settings(), meter.peak_bytes))
            del cache
    return runs
