"""Registered test estimators: one that fails, one whose check() refuses, one that counts its fits,
one that emits a third-party FutureWarning, and a checkpoint-indexed one that copies further training."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_fimoda.estimators.base import Estimator
from lightning_fimoda.estimators.first_order import GradDot
from lightning_fimoda.exceptions import ConfigurationError
from lightning_fimoda.further_training import FurtherTrainingLoop
from lightning_fimoda.registry import register_estimator


@register_estimator("test_failing")
class Failing(Estimator):
    def _fit(self) -> None:
        raise RuntimeError("boom in fit")

    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        raise AssertionError("never reached")


@register_estimator("test_refusing")
class Refusing(GradDot):
    def check(self, model, task, train_dataset) -> None:
        raise ConfigurationError("test_refusing: this model is not supported")


@register_estimator("test_counting")
class Counting(GradDot):
    fits: ClassVar[int] = 0

    def __init__(self, *, scale: float = 1.0, label: str | None = None) -> None:
        super().__init__(label=label)
        self.scale = scale

    def _fit(self) -> None:
        type(self).fits += 1
        super()._fit()

    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        return super()._score(test_dataset, test_indices) * self.scale


@register_estimator("test_noisy")
class Noisy(GradDot):
    def _fit(self) -> None:
        warnings.warn_explicit("old API", FutureWarning, "thirdparty/lib.py", 1, module="thirdparty.lib")
        super()._fit()


@register_estimator("test_gold_copy")
class GoldCopy(Estimator):
    """Checkpoint-indexed scores ``[C, T, m]`` equal to the gold standard's (``mean`` adjustment), by
    running the same further training itself (deterministic)."""

    checkpoint_indexed = True

    def __init__(self, *, gold: dict[str, Any] | None = None, label: str | None = None) -> None:
        super().__init__(label=label)
        self.gold = dict(gold or {})

    def _fit(self) -> None:
        pass

    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        loop = FurtherTrainingLoop(self.task_, **{"progress": False, **self.gold})
        with torch.enable_grad():
            gold = loop.run(self.model_, self.train_dataset_, test_dataset, self.train_indices_, test_indices)
        return gold.scores("mean")
