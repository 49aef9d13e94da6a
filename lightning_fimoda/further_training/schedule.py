"""What one further-training run does, shared by the vectorised and the sequential paths (SPEC §2).

- :func:`epoch_permutation` — the sample order of seed ``s`` in epoch ``e``: the same for the full
  run and every leave-one-out run of that seed (common random numbers).
- :class:`Schedule` — a :class:`FurtherTrainingConfig` over ``n`` examples: steps per epoch, steps
  per run and the checkpoints at which ``f`` is evaluated.

Run length: with ``epochs=E`` every run makes ``E`` passes over its own data (a ``drop`` run has
``n − 1`` examples; the last batch of an epoch may be smaller than ``b``); with ``steps=T`` every run
takes ``T`` optimizer steps, starting a new permutation whenever its data is used up. Checkpoints:
``eval_every="epoch"`` evaluates after each epoch (labels ``1..E``); ``eval_every=k`` after every
``k`` steps and after the last step (labels are step counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from .config import FurtherTrainingConfig

__all__ = ["Schedule", "epoch_permutation"]


def epoch_permutation(seed: int, epoch: int, n: int) -> Tensor:
    """Permutation ``[n]`` (int64) of the training set for ``seed`` in ``epoch`` (0-based)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, int(epoch)])
    gen = torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))
    return torch.randperm(n, generator=gen)


@dataclass(frozen=True)
class Schedule:
    """The steps and checkpoints of every run of a job over ``n`` training examples.

    Built by :meth:`FurtherTrainingConfig.schedule`; reads the config's settings through attribute
    access (``schedule.batch_size`` is ``schedule.config.batch_size``).
    """

    config: FurtherTrainingConfig
    n: int

    def __getattr__(self, name: str) -> Any:
        if name == "config":  # not yet set (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.config, name)

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ConfigurationError(
                f"Leave-one-out further training needs at least 2 training examples, got {self.n}."
            )
        if (
            self.epochs is not None
            and self.eval_every != "epoch"
            and self.steps_per_epoch(excluded=True) != self.steps_per_epoch(excluded=False)
        ):
            raise ConfigurationError(
                f"eval_every={self.eval_every} with epochs= and leave_out='drop' needs every run to take the "
                f"same number of steps per epoch, but (n - 1) = {self.n - 1} is a multiple of batch_size="
                f"{self.batch_size}, so leave-one-out runs take one step fewer per epoch than the full run. "
                "Use steps= or eval_every='epoch'."
            )

    def steps_per_epoch(self, excluded: bool) -> int:
        """Batches per epoch of a run (``excluded``: a leave-one-out run, which matters for ``drop``)."""
        size = self.n - 1 if excluded and self.leave_out == "drop" else self.n
        return math.ceil(size / self.batch_size)

    def run_steps(self, excluded: bool) -> int:
        """Optimizer steps of one run (a ``drop`` LOO run may take fewer per epoch)."""
        return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch(excluded)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the full run."""
        return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch(excluded=False)

    @property
    def checkpoints(self) -> list[int]:
        """Epoch numbers ``1..E``, or step counts ``k, 2k, ...`` plus the last step."""
        if self.eval_every == "epoch":
            return list(range(1, self.epochs + 1))
        total = self.total_steps
        out = list(range(self.eval_every, total + 1, self.eval_every))
        if not out or out[-1] != total:
            out.append(total)
        return out

    @property
    def checkpoint_steps(self) -> list[int]:
        """Optimizer steps of the full run after which ``f`` is measured (one per checkpoint)."""
        if self.eval_every == "epoch":
            per_epoch = self.steps_per_epoch(excluded=False)
            return [e * per_epoch for e in self.checkpoints]
        return self.checkpoints
