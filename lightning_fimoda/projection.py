"""Seeded random projections of per-sample gradients, block-wise over parameters (as TRAK and LoGra).

``Π g = Rᵀ g / √d`` with a ``[P, d]`` random matrix ``R`` of independent Rademacher (±1) or standard
normal entries, so ``E[(Π g)·(Π h)] = g·h`` (Johnson-Lindenstrauss). ``R`` is never held in full:
rows ``[b·B, (b+1)·B)`` (block ``b`` of ``B = block_size`` parameter entries) are generated when needed
from their own seed, derived from ``seed`` and ``b``, so the same :class:`Projector` gives the same
``Π`` for every chunk, for training and test gradients alike, on any chunking.

Blocks are drawn on the gradients' device (no ``[B, d]`` host-to-device copy per chunk), so ``R``
depends on the device type: torch's CPU and CUDA generators give different (equally valid) matrices
for the same seed. Project training and test gradients on one device; results agree across devices
only in expectation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .exceptions import ConfigurationError

__all__ = ["Projector"]

ProjectionKind = Literal["rademacher", "gaussian"]
_BLOCK_BYTES = 8 << 20  # default size of one generated block of R
_SEED_STRIDE = 1_000_003  # per-block seeds: seed * stride + block


@dataclass(frozen=True)
class Projector:
    """``[c, P] -> [c, dim]`` random projection; the same object must project train and test gradients.

    Args:
        dim: projected dimension ``d``.
        kind: ``"rademacher"`` (±1 entries) or ``"gaussian"`` (standard normal entries).
        seed: base seed; block ``b`` of ``R`` uses ``seed * 1_000_003 + b``.
        block_size: parameter entries (rows of ``R``) generated at a time; ``None``: as many as fit
            8 MiB. The block size is part of the projection: different sizes give different ``R``.
    """

    dim: int
    kind: ProjectionKind = "rademacher"
    seed: int = 0
    block_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ConfigurationError(f"Projector dim must be a positive integer, got {self.dim!r}.")
        if self.kind not in ("rademacher", "gaussian"):
            raise ConfigurationError(f"Projector kind must be 'rademacher' or 'gaussian', got {self.kind!r}.")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise ConfigurationError(f"Projector block_size must be a positive integer, got {self.block_size!r}.")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigurationError(f"Projector seed must be an integer >= 0, got {self.seed!r}.")

    def rows_per_block(self) -> int:
        """``B``: parameter entries per generated block (fixed, so ``R`` does not depend on the dtype)."""
        return self.block_size or max(1, _BLOCK_BYTES // (8 * self.dim))

    def block(self, b: int, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Rows ``[b·B, b·B + rows)`` of ``R / √d``, ``[rows, dim]``."""
        gen = torch.Generator(device=device).manual_seed(self.seed * _SEED_STRIDE + b)
        if self.kind == "gaussian":
            r = torch.randn(rows, self.dim, generator=gen, dtype=dtype, device=device)
        else:
            r = torch.randint(0, 2, (rows, self.dim), generator=gen, device=device).to(dtype).mul_(2).sub_(1)
        return r.mul_(1.0 / math.sqrt(self.dim))

    def project(self, grads: Tensor) -> Tensor:
        """``Π g`` for every row of ``grads`` ``[c, P]``: ``[c, dim]``, same dtype and device."""
        if grads.dim() != 2:
            raise ConfigurationError(f"Projector.project expects [c, P] gradients, got shape {tuple(grads.shape)}.")
        out = torch.zeros(grads.shape[0], self.dim, dtype=grads.dtype, device=grads.device)
        size = self.rows_per_block()
        for b, start in enumerate(range(0, grads.shape[1], size)):
            part = grads[:, start : start + size]
            out.addmm_(part, self.block(b, part.shape[1], grads.dtype, grads.device))
        return out

    __call__ = project
