"""Sharding units of work over the processes of a ``torch.distributed`` job (DDP, Lightning Fabric).

When the loop runs inside an initialised process group (``Fabric(strategy="ddp")``, a Lightning
``Trainer`` with DDP, ``torchrun``), every rank calls ``run()`` with the same arguments; the pending
units are dealt out round-robin, each rank computes its share, and the results are exchanged with
``all_gather_object`` so every rank (rank 0 included) returns the complete gold standard.
With a ``run_dir``, it must be on a file system every rank can read.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["all_gather", "barrier", "rank_and_world", "shard"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: list, rank: int, world: int) -> list:
    """The items this rank handles: every ``world``-th one, starting at ``rank``."""
    return items[rank::world]


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` outside a process group)."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
