"""The memory budget for per-sample gradients: how much may be resident, how big a streamed chunk is.

A budget of ``B`` bytes is split in two halves: gradient sets kept resident by the
:class:`~lightning_fimoda.gradients.GradientCache` (full ``[N, P]`` matrices) share one half, and the
chunk being computed (its rows plus ``vmap``'s intermediates) uses the other, so the cache never holds
more than ``B`` bytes of gradients at once.
"""

from __future__ import annotations

import psutil
import torch

from ..exceptions import ConfigurationError

__all__ = [
    "DEFAULT_BUDGET_FRACTION",
    "CPU_CHUNK_BYTES",
    "DEFAULT_MEMORY_BUDGET",
    "MAX_CHUNK",
    "available_memory",
    "chunk_size_for",
    "itemsize",
    "resolve_memory_budget",
]

DEFAULT_MEMORY_BUDGET: int | None = None  # None: DEFAULT_BUDGET_FRACTION of the memory available now
DEFAULT_BUDGET_FRACTION = 0.25
MAX_CHUNK = 1024
VMAP_FACTOR = 4  # bytes of one example's gradient row times this: the row plus vmap's intermediates
# On CPU a chunk larger than this is slower, not faster (issue 17, CPU time, 1 thread): per-sample
# gradients of the CIFAR-10 ResNet-9 (265k parameters, ~4 MiB per example here) took 0.57 s per 128
# images in chunks of 32–64 and 1.3 s in one chunk of 128; the Concrete MLP (927 examples, 0.26 GiB)
# is fastest in one chunk (two chunks of 471: about 1.5x the CPU time).
CPU_CHUNK_BYTES = 256 * 2**20


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free now: on CUDA the driver's free memory (``torch.cuda.mem_get_info``) plus what torch's
    caching allocator holds reserved but unused; psutil's ``available`` otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    return int(psutil.virtual_memory().available)


def resolve_memory_budget(budget: int | None, device: torch.device | str = "cpu") -> int:
    """The budget in bytes: ``budget`` itself, or (``None``) 25% of :func:`available_memory` on ``device``.

    Raises :class:`ConfigurationError` for anything but a positive integer or ``None``.
    """
    if budget is None:
        return max(1, int(DEFAULT_BUDGET_FRACTION * available_memory(device)))
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ConfigurationError(f"memory_budget must be a positive number of bytes or None, got {budget!r}.")
    return budget


def describe_budget(budget: int | None, device: torch.device | str = "cpu") -> str:
    """Where the budget came from, for reports."""
    if budget is not None:
        return "given"
    where = "CUDA free memory" if torch.device(device).type == "cuda" else "available CPU memory (psutil)"
    return f"{DEFAULT_BUDGET_FRACTION:.0%} of {where} when resolved"


def chunk_size_for(num_params: int, element_size: int, budget: int, device: torch.device | str = "cpu") -> int:
    """Examples per vmapped chunk so that rows and intermediates (``VMAP_FACTOR`` rows each) fit ``budget``
    (on CPU at most :data:`CPU_CHUNK_BYTES` of it)."""
    per_example = max(1, num_params * element_size * VMAP_FACTOR)
    if torch.device(device).type == "cpu":
        budget = min(budget, CPU_CHUNK_BYTES)
    return int(max(1, min(MAX_CHUNK, budget // per_example)))


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a floating ``dtype``."""
    return torch.finfo(dtype).bits // 8
