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

from ..exceptions import MismatchError
from .fingerprint import differences

__all__ = ["all_gather", "check_same_job", "rank_and_world", "shard"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: list, rank: int, world: int) -> list:
    """The items this rank handles: every ``world``-th one, starting at ``rank``."""
    return items[rank::world]


def all_gather(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` outside a process group)."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def check_same_job(fingerprint: dict[str, Any]) -> None:
    """Compare every rank's job fingerprint with rank 0's before any work (a no-op outside a group).

    Raises :class:`MismatchError` on every rank, naming the ranks and the differing components, so a
    rank holding other weights, data or settings never contributes units.
    """
    gathered = all_gather(fingerprint)
    diffs = {r: differences(gathered[0], fp) for r, fp in enumerate(gathered) if r}
    diffs = {r: d for r, d in diffs.items() if d}
    if diffs:
        named = "; ".join(f"rank {r} differs from rank 0 in {d}" for r, d in diffs.items())
        raise MismatchError(
            f"The ranks of this torch.distributed job are not running the same further-training job: {named}. "
            "Every rank must call run() with the same model weights, task, data and settings."
        )
