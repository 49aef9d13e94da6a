"""``FurtherTrainingConfig``: everything that defines the numbers of a further-training job (SPEC §2).

One frozen, validated dataclass: optimizer hyperparameters, batch size, run length, checkpoints,
leave-out mechanism, clipping, seeds, adjustments and train mode. Settings that only change how the
numbers are computed (engine, chunking, memory budget, run directory, progress) are arguments of
:class:`~lightning_fimoda.further_training.FurtherTrainingLoop`, not part of this config.

The schedule over ``n`` training examples (steps per epoch, checkpoints) is :meth:`schedule`;
:meth:`checkpoints` and :meth:`checkpoint_steps` give it to other components (a horizon-matched
estimator copies the schedule from here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..exceptions import ConfigurationError
from .schedule import Schedule

__all__ = ["ADJUSTMENTS", "LEAVE_OUT", "OPTIMIZERS", "FurtherTrainingConfig"]

OPTIMIZERS = ("sgd", "adam", "adamw")
LEAVE_OUT = ("subtract", "drop")
ADJUSTMENTS = ("mean", "full")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class FurtherTrainingConfig:
    """The settings of every run of one leave-one-out further-training job (validated when built).

    Attributes:
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"`` (fresh state for every run).
        lr: learning rate (> 0). weight_decay, momentum (SGD only), betas, eps: as in ``torch.optim``.
        batch_size: mini-batch size ``b``. epochs / steps: length of every run, exactly one of them.
        eval_every: ``"epoch"`` or a number of steps ``k`` (checkpoints ``k, 2k, ...`` and the last).
        leave_out: ``"subtract"`` (``L_B = mean_B ℓ − ℓ_j / n``) or ``"drop"`` (``j`` removed).
        grad_clip: max global gradient norm per run (after the subtraction); ``None``: off.
        seeds: ``S`` (seeds ``0..S-1``) or explicit seeds; stored as a tuple.
        adjustments: gold-standard adjustments to support (``"full"`` makes the full-data run).
        train_mode: train with the model in train mode (dropout on); default eval mode.
    """

    optimizer: str = "sgd"
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 128
    epochs: int | None = None
    steps: int | None = None
    eval_every: str | int = "epoch"
    leave_out: str = "subtract"
    grad_clip: float | None = None
    seeds: int | Sequence[int] = field(default=1)
    adjustments: str | Sequence[str] = ADJUSTMENTS
    train_mode: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "seeds", _resolve_seeds(self.seeds))
        adjustments = (self.adjustments,) if isinstance(self.adjustments, str) else tuple(self.adjustments)
        if not adjustments or any(a not in ADJUSTMENTS for a in adjustments):
            raise ConfigurationError(
                f"adjustments must be a non-empty subset of {ADJUSTMENTS}, got {adjustments!r}."
            )
        set_(self, "adjustments", adjustments)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ConfigurationError(f"betas must be a pair (beta1, beta2), got {self.betas!r}.")
        set_(self, "betas", tuple(float(b) for b in self.betas))
        self._check_optimizer()
        self._check_length()

    def _check_optimizer(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigurationError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if not (_number(self.lr) and self.lr > 0):
            raise ConfigurationError(f"lr must be a finite number > 0, got {self.lr!r}.")
        if not (_number(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigurationError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        if not (_number(self.momentum) and 0 <= self.momentum < 1):
            raise ConfigurationError(f"momentum must be in [0, 1), got {self.momentum!r}.")
        if self.momentum and self.optimizer != "sgd":
            raise ConfigurationError(f"momentum applies to optimizer='sgd' only; {self.optimizer!r} uses betas.")
        if not all(_number(b) and 0 <= b < 1 for b in self.betas):
            raise ConfigurationError(f"betas must lie in [0, 1), got {self.betas!r}.")
        if not (_number(self.eps) and self.eps > 0):
            raise ConfigurationError(f"eps must be > 0, got {self.eps!r}.")
        if self.grad_clip is not None and not (_number(self.grad_clip) and self.grad_clip > 0):
            raise ConfigurationError(f"grad_clip must be None or a finite number > 0, got {self.grad_clip!r}.")
        if not isinstance(self.train_mode, bool):
            raise ConfigurationError(f"train_mode must be True or False, got {self.train_mode!r}.")

    def _check_length(self) -> None:
        if self.leave_out not in LEAVE_OUT:
            raise ConfigurationError(f"leave_out must be one of {LEAVE_OUT}, got {self.leave_out!r}.")
        if (self.epochs is None) == (self.steps is None):
            raise ConfigurationError("Give exactly one of epochs= or steps= (the length of every run).")
        for name in ("epochs", "steps", "batch_size"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}.")
        if self.eval_every == "epoch":
            if self.epochs is None:
                raise ConfigurationError(
                    "eval_every='epoch' needs epochs=; with steps= give eval_every=<int steps>."
                )
        elif not _positive_int(self.eval_every):
            raise ConfigurationError(
                f"eval_every must be 'epoch' or a positive number of steps, got {self.eval_every!r}."
            )

    # -- derived ----------------------------------------------------------------------------------
    @property
    def full_run(self) -> bool:
        """Whether the full-data run is made (only the ``full`` adjustment needs it)."""
        return "full" in self.adjustments

    @property
    def checkpoint_unit(self) -> str:
        return "epoch" if self.eval_every == "epoch" else "step"

    def schedule(self, n_train: int) -> Schedule:
        """The runs' schedule over ``n_train`` examples (validates what depends on ``n``)."""
        return Schedule(self, n_train)

    def checkpoints(self, n_train: int) -> list[int]:
        """Checkpoint labels: epochs ``1..E``, or step counts ``k, 2k, ...`` plus the last step."""
        return self.schedule(n_train).checkpoints

    def checkpoint_steps(self, n_train: int) -> list[int]:
        """Optimizer steps of the full run after which ``f`` is measured (one per checkpoint)."""
        return self.schedule(n_train).checkpoint_steps

    def replace(self, **changes: Any) -> FurtherTrainingConfig:
        """A copy with ``changes`` applied (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = sorted(set(changes) - set(values))
        if unknown:
            raise ConfigurationError(f"{type(self).__name__} has no settings {unknown}; valid: {sorted(values)}.")
        return type(self)(**{**values, **changes})

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings (the ``further_training`` entry of a gold standard's config)."""
        return {
            "optimizer": {
                "name": self.optimizer,
                "lr": self.lr,
                "weight_decay": self.weight_decay,
                "momentum": self.momentum,
                "betas": list(self.betas),
                "eps": self.eps,
            },
            "epochs": self.epochs,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "seeds": list(self.seeds),
            "leave_out": self.leave_out,
            "eval_every": self.eval_every,
            "grad_clip": self.grad_clip,
            "adjustments": list(self.adjustments),
            "train_mode": self.train_mode,
        }


def _resolve_seeds(seeds: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(seeds, bool) or not isinstance(seeds, (int, Sequence)) or isinstance(seeds, str):
        raise ConfigurationError(f"seeds must be a positive integer or a list of integers, got {seeds!r}.")
    if isinstance(seeds, int):
        if seeds <= 0:
            raise ConfigurationError(f"seeds must be >= 1 (the number of seeds), got {seeds}.")
        return tuple(range(seeds))
    out = tuple(int(s) for s in seeds)
    if not out:
        raise ConfigurationError("seeds must not be empty.")
    if len(set(out)) != len(out):
        raise ConfigurationError(f"seeds contain duplicates: {list(out)}.")
    if any(s < 0 for s in out):
        raise ConfigurationError(f"seeds must be non-negative integers, got {list(out)}.")
    return out
