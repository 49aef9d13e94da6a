"""The estimators' sums over training examples, split over the processes of a ``torch.distributed`` job.

Inside an initialised process group (a Lightning ``Trainer(strategy="ddp")``, or ``torchrun`` with
``torch.distributed.init_process_group``) every rank runs the same estimators on the same data. Each
rank takes one contiguous shard of the training examples (:func:`shard_range`) and the partial
results are combined so that every rank ends with the same numbers:

- :func:`sum_over_ranks`: the ranks' partial sums, added on rank 0 and sent to every rank, so all ranks
  hold bitwise the same result (solvers then take the same steps on every rank), in memory of one sum;
- :func:`merge_rows`: rows filled by the rank that owns them and zero elsewhere, summed (exact).

Every collective must be reached by every rank: call ``attribute()`` / ``run_estimators`` on all
ranks, or run rank-local code inside :func:`single_process`. Outside a process group, with one
process, or inside :func:`single_process`, every function here is the identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "broadcast_from_zero",
    "merge_rows",
    "rank_and_world",
    "shard_range",
    "single_process",
    "sum_floats",
    "sum_over_ranks",
]

_LOCAL: ContextVar[bool] = ContextVar("fimoda_single_process", default=False)


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the process group the estimators split over; ``(0, 1)`` outside one
    or inside :func:`single_process`."""
    if not _LOCAL.get() and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Run attribution in this process alone (no collectives), e.g. on rank 0 only of a DDP job."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def shard_range(n: int) -> tuple[int, int]:
    """Positions ``[lo, hi)`` of the ``n`` examples this rank handles: one contiguous shard per rank."""
    rank, world = rank_and_world()
    return n * rank // world, n * (rank + 1) // world


def sum_over_ranks(partial: Tensor) -> Tensor:
    """``Σ_r partial_r`` over the ranks (reduced on rank 0, then sent to all: the same bits on every
    rank, so every rank's solver takes the same steps). May reuse ``partial``'s memory."""
    if rank_and_world()[1] == 1:
        return partial
    total = partial.contiguous()
    dist.reduce(total, dst=0)
    dist.broadcast(total, src=0)
    return total


def sum_floats(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """:func:`sum_over_ranks` of a few Python numbers (float64; ``device``: the backend's, e.g. CUDA for NCCL)."""
    if rank_and_world()[1] == 1:
        return list(values)
    return sum_over_ranks(torch.tensor(list(values), dtype=torch.float64, device=device)).tolist()


def merge_rows(rows: Tensor) -> Tensor:
    """In place: every rank's rows into every rank (each row nonzero on at most one rank; exact)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(rows)
    return rows


def broadcast_from_zero(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects; ``obj`` itself with one process)."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
