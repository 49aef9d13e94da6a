"""kronfluence's process-wide state as our kronfluence estimators use it: its device, its own
distributed mode, the directory its files go to, and its memory release.

**Several processes.** kronfluence splits factor fitting and scoring over the ranks itself (its
``State`` turns distributed when ``LOCAL_RANK`` is set, CUDA is available and the analysis is not
forced onto the CPU: ``torchrun`` or a Lightning DDP trainer on GPUs). It then wraps the prepared model
in ``DistributedDataParallel``, gives each rank its share of the data through a distributed sampler,
all-reduces the factors, and rank 0 writes them: every rank must read the same directory (rank 0's,
sent to the others; one machine or a shared file system), and rank 0 reads the scores and sends them
to every rank. Without that set-up (e.g. gloo on CPU), kronfluence runs in one process and every rank
fits the same factors itself (same numbers, no split).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .._files import WorkDir
from ..distributed import broadcast_from_zero, rank_and_world
from ._library import library_module

__all__ = ["kronfluence_distributed", "light_memory_release", "shared_workdir"]

_RELEASE_MEMORY_USERS = (
    "kronfluence.computer.computer",
    "kronfluence.factor.eigen",
    "kronfluence.score.dot_product",
    "kronfluence.score.self",
)


def _state_on(device: torch.device, name: str) -> None:
    """kronfluence keeps one process-wide device, fixed by its first ``Analyzer``: reset it when this model
    is elsewhere (a CPU run, then a CUDA one), except under its own torchrun set-up (``LOCAL_RANK``)."""
    state_module = library_module("kronfluence.utils.state", name)
    state = state_module.State._shared_state
    if not state or os.environ.get("LOCAL_RANK") is not None or state.get("device") == device:
        return
    state_module.State._reset_state()
    if device.type == "cuda":
        torch.cuda.set_device(device)


def kronfluence_distributed(device: torch.device, name: str) -> bool:
    """Put kronfluence's state on ``device``; whether kronfluence will split its work over our ranks."""
    _state_on(device, name)
    state = library_module("kronfluence.utils.state", name).State(cpu=device.type == "cpu")
    return bool(state.use_distributed) and rank_and_world()[1] > 1


def shared_workdir(workdir: WorkDir, owner: object, prefix: str, output_dir: Any, distributed: bool) -> Path:
    """A fresh directory for one fit; when kronfluence is distributed, rank 0's on every rank (rank 0
    alone removes it)."""
    if not distributed:
        return workdir.new(owner, prefix, output_dir)
    if rank_and_world()[0] == 0:
        path = workdir.new(owner, prefix, output_dir)
    else:
        workdir.release()
        path = None
    workdir.path = broadcast_from_zero(path)
    return workdir.path


@contextlib.contextmanager
def light_memory_release(cuda: bool) -> Iterator[None]:
    """Replace kronfluence's ``release_memory`` while it runs for us.

    Called about ten times per fit and score, it runs a full ``gc.collect()`` (seconds in a large
    process) and ``torch.compiler.reset()``, which discards the user's compiled graphs. Ours frees the
    CUDA cache (after collecting garbage) on GPU and does nothing on CPU.
    """

    def release() -> None:
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()

    modules = [importlib.import_module(name) for name in _RELEASE_MEMORY_USERS]
    originals = [m.release_memory for m in modules]
    for m in modules:
        m.release_memory = release
    try:
        yield
    finally:
        for m, original in zip(modules, originals):
            m.release_memory = original
