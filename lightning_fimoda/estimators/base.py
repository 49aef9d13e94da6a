"""The interface every attribution estimator follows.

``est.fit(model, task, train_dataset, train_indices=None)`` prepares whatever depends on the training
data (per-sample gradients, curvature, factors); ``est.score(test_dataset, test_indices=None)`` returns
``[n_test, n_train_scored]`` scores with SPEC §1's sign: ``τ(j, x) ≈ f(x; θ without z_j) − f(x; θ)``,
positive = helpful.

Constructor arguments are stored as attributes of the same name (as in scikit-learn), so
:meth:`Estimator.settings` can report them; values chosen during fitting (damping used, LiSSA scale,
solver iterations) go into :attr:`Estimator.info`.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._data import resolve_indices
from ..gradients import GradientCache, PerSampleGradients
from ..task import AttributionTask

__all__ = ["Estimator"]


class Estimator(ABC):
    """Base class of attribution estimators.

    Args:
        params: parameter or module names to attribute over (``None``: all trainable parameters).
        label: name under which results are reported (default: the registry name).
    """

    name: ClassVar[str] = "estimator"
    checkpoint_indexed: ClassVar[bool] = False  # True: score() returns [n_checkpoints, n_test, n_train]

    def __init__(self, *, params: Sequence[str] | None = None, label: str | None = None) -> None:
        self.params = list(params) if params is not None else None
        self.label = label
        self.info: dict[str, Any] = {}
        self._fitted = False

    # -- public API ---------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self._label or self.name

    @label.setter
    def label(self, value: str | None) -> None:
        self._label = value

    def check(self, model: nn.Module, task: AttributionTask, train_dataset: Any) -> None:
        """Cheap validation before any expensive work (stand-in; subclasses may raise ConfigurationError)."""
        return None

    def fit(
        self,
        model: nn.Module,
        task: AttributionTask,
        train_dataset: Any,
        train_indices: Sequence[int] | Tensor | None = None,
        *,
        cache: GradientCache | None = None,
    ) -> Estimator:
        """Prepare attribution to ``train_dataset[train_indices]`` (all items when ``None``)."""
        if not isinstance(task, AttributionTask):
            raise TypeError(f"task must be an AttributionTask, got {type(task).__name__}.")
        self.model_ = model
        self.task_ = task
        self.train_dataset_ = train_dataset
        self.train_indices_ = resolve_indices(train_dataset, train_indices, "training")
        self.cache_ = cache if cache is not None else GradientCache()
        self.info = {}
        self._fit()
        self._fitted = True
        return self

    def score(self, test_dataset: Any, test_indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """Scores ``[n_test, n_train_scored]`` (CPU), positive = the training example helps ``f(x)``."""
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__}.score() called before fit().")
        idx = resolve_indices(test_dataset, test_indices, "test")
        scores = self._score(test_dataset, idx)
        expected = (idx.numel(), self.train_indices_.numel())
        if self.checkpoint_indexed:  # [n_checkpoints, n_test, n_train]
            expected = (scores.shape[0] if scores.dim() == 3 else -1, *expected)
        if tuple(scores.shape) != expected:
            raise RuntimeError(f"{self.label}: scores have shape {tuple(scores.shape)}, expected {expected}.")
        if not torch.isfinite(scores).all():
            raise FloatingPointError(f"{self.label}: non-finite attribution scores.")
        return scores.detach().cpu()

    def settings(self) -> dict[str, Any]:
        """Constructor arguments (as given) plus the values chosen while fitting (:attr:`info`)."""
        sig = inspect.signature(type(self).__init__)
        args = {p: getattr(self, p) for p in sig.parameters if p != "self" and hasattr(self, p)}
        args["label"] = self._label
        return {"estimator": self.name, **args, **self.info}

    def __repr__(self) -> str:
        sig = inspect.signature(type(self).__init__)
        shown = []
        for p, spec in sig.parameters.items():
            if p == "self" or not hasattr(self, p):
                continue
            value = self._label if p == "label" else getattr(self, p)
            if value != spec.default:
                shown.append(f"{p}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    # -- helpers for subclasses -----------------------------------------------------------------
    def train_gradients(self) -> PerSampleGradients:
        """Cached per-sample training-loss gradients ``g_j`` ``[n_train, P]``."""
        return self.cache_.get(
            self.model_, self.task_, self.train_dataset_, self.train_indices_,
            kind="loss", params=self.params, what="training",
        )

    def test_gradients(self, test_dataset: Any, test_indices: Tensor) -> PerSampleGradients:
        """Cached per-sample measurement gradients ``g_x`` ``[n_test, P]``."""
        return self.cache_.get(
            self.model_, self.task_, test_dataset, test_indices,
            kind="measurement", params=self.params, what="test",
        )

    # -- to implement ---------------------------------------------------------------------------
    @abstractmethod
    def _fit(self) -> None:
        """Prepare from ``self.model_``, ``self.task_``, ``self.train_dataset_``, ``self.train_indices_``."""

    @abstractmethod
    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        """Return ``[n_test, n_train_scored]`` scores for validated ``test_indices``."""
