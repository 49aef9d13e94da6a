"""What one further-training run does, shared by the vectorised and the sequential paths (SPEC §2).

- :func:`epoch_permutation` — the sample order of seed ``s`` in epoch ``e``: the same for the full
  run and every leave-one-out run of that seed (common random numbers).
- :class:`TrainingSpec` — optimizer, batch size, length (``epochs`` or ``steps``), leave-out mechanism,
  clipping and the checkpoints at which ``f`` is evaluated.

Run length: with ``epochs=E`` every run makes ``E`` passes over its own data (a ``drop`` run has
``n − 1`` examples; the last batch of an epoch may be smaller than ``b``); with ``steps=T`` every run
takes ``T`` optimizer steps, starting a new permutation whenever its data is used up. Checkpoints:
``eval_every="epoch"`` evaluates after each epoch (labels ``1..E``); ``eval_every=k`` after every
``k`` steps and after the last step (labels are step counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .optimizers import OptimizerConfig

__all__ = ["LEAVE_OUT", "TrainingSpec", "epoch_permutation"]

LEAVE_OUT = ("subtract", "drop")


def epoch_permutation(seed: int, epoch: int, n: int) -> Tensor:
    """Permutation ``[n]`` (int64) of the training set for ``seed`` in ``epoch`` (0-based)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, int(epoch)])
    gen = torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))
    return torch.randperm(n, generator=gen)


@dataclass(frozen=True)
class TrainingSpec:
    """Validated settings of every run of one further-training job over ``n`` training examples."""

    optimizer: OptimizerConfig
    n: int | None
    batch_size: int
    epochs: int | None
    steps: int | None
    eval_every: str | int
    leave_out: str
    grad_clip: float | None

    def __post_init__(self) -> None:
        if self.leave_out not in LEAVE_OUT:
            raise ValueError(f"leave_out must be one of {LEAVE_OUT}, got {self.leave_out!r}.")
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("Give exactly one of epochs= or steps= (the length of every run).")
        for name in ("epochs", "steps", "batch_size"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, int) and not isinstance(value, bool) and value > 0
            ):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.eval_every == "epoch":
            if self.epochs is None:
                raise ValueError("eval_every='epoch' needs epochs=; with steps= give eval_every=<int steps>.")
        elif not (
            isinstance(self.eval_every, int) and not isinstance(self.eval_every, bool) and self.eval_every > 0
        ):
            raise ValueError(
                f"eval_every must be 'epoch' or a positive number of steps, got {self.eval_every!r}."
            )
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be None or a finite number > 0, got {self.grad_clip!r}.")
        if self.n is None:  # settings only, checked before the data is known
            return
        if self.n < 2:
            raise ValueError(
                f"Leave-one-out further training needs at least 2 training examples, got {self.n}."
            )
        if (
            self.epochs is not None
            and self.eval_every != "epoch"
            and self.steps_per_epoch(excluded=True) != self.steps_per_epoch(excluded=False)
        ):
            raise ValueError(
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
    def checkpoint_unit(self) -> str:
        return "epoch" if self.eval_every == "epoch" else "step"

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

    def to_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.to_dict(),
            "n_train": self.n,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "steps": self.steps,
            "eval_every": self.eval_every,
            "leave_out": self.leave_out,
            "grad_clip": self.grad_clip,
        }
