"""The interface every attribution estimator follows.

``est.fit(model, task, train_dataset, train_indices=None)`` prepares whatever depends on the training
data (per-sample gradients, curvature, factors); ``est.score(test_dataset, test_indices=None)`` returns
``[n_test, n_train_scored]`` scores with SPEC §1's sign: ``τ(j, x) ≈ f(x; θ without z_j) − f(x; θ)``,
positive = helpful. Estimators declaring ``checkpoint_indexed = True`` return
``[n_checkpoints, n_test, n_train_scored]`` instead.

Settings live in one frozen, validated :class:`~lightning_fimoda.estimators.config.EstimatorConfig`
(``est.config``; the class is ``config_class``), given as keyword arguments or as a config object;
values chosen during fitting (damping used, LiSSA scale, solver iterations) go into :attr:`Estimator.info`.
:meth:`Estimator.check` validates a model, task and dataset cheaply (no gradients) before any work.
"""

from __future__ import annotations

import dataclasses
import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._data import resolve_indices
from .._settings import json_safe
from ..exceptions import ConfigurationError, NonFiniteError, NotFittedError, PrecisionError
from ..functional import select_parameters
from ..gradients import GradientCache, GradientStream, PerSampleGradients
from ..projection import Projector
from ..task import AttributionTask
from .config import EstimatorConfig, SettingsConfig, split_kwargs

__all__ = ["HALF_DTYPES", "Estimator", "make_config"]

HALF_DTYPES = (torch.float16, torch.bfloat16)


def make_config(owner: str, cls: type[SettingsConfig], values: dict[str, Any]) -> Any:
    """``cls(**values)``, with ``owner`` (the estimator's name) prefixed to validation errors."""
    try:
        return cls(**values)
    except ConfigurationError as err:
        raise ConfigurationError(f"Estimator {owner!r}: {err}") from None


class Estimator(ABC):
    """Base class of attribution estimators.

    Args:
        config: a ``config_class`` instance (keyword arguments, if also given, replace its fields).
        **kwargs: fields of ``config_class`` (for the base: ``params``, ``label``); unknown names raise
            ``TypeError`` listing the allowed ones, bad values :class:`ConfigurationError`.

    A subclass with settings declares ``config_class`` (a frozen dataclass deriving from
    :class:`EstimatorConfig`) and reads them from ``self.config``.
    """

    name: ClassVar[str] = "estimator"
    config_class: ClassVar[type[EstimatorConfig]] = EstimatorConfig
    checkpoint_indexed: ClassVar[bool] = False  # True: score() returns [n_checkpoints, n_test, n_train]

    def __init__(self, config: EstimatorConfig | None = None, **kwargs: Any) -> None:
        self.config = self._build_config(self.config_class, config, kwargs)
        self.info: dict[str, Any] = {}
        self._fitted = False

    def _build_config(self, cls: type[Any], config: Any, kwargs: dict[str, Any]) -> Any:
        (values,) = split_kwargs(self.name, kwargs, [cls])
        if config is not None:
            if not isinstance(config, cls):
                raise ConfigurationError(
                    f"Estimator {self.name!r}: config must be a {cls.__name__}, got {type(config).__name__}."
                )
            values = {**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}, **values}
        return make_config(self.name, cls, values)

    # -- public API ---------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self.config.label or self.name

    @property
    def params(self) -> list[str] | None:
        return None if self.config.params is None else list(self.config.params)

    def check(self, model: nn.Module, task: AttributionTask, train_dataset: Any) -> None:
        """Cheap validation before any work (no gradients): the task, the parameter selection, the
        parameters' dtype and device, and the estimator's own requirements (:meth:`_check`).

        Half-precision (float16 / bfloat16) parameters are refused with :class:`PrecisionError`
        (attribution differences are below their resolution; cast the model with ``model.float()``),
        and so are parameters on the ``meta`` device.
        """
        if not isinstance(task, AttributionTask):
            raise TypeError(f"task must be an AttributionTask, got {type(task).__name__}.")
        try:
            names = select_parameters(model, self.params)
        except ValueError as err:
            raise ConfigurationError(f"{self.label}: {err}") from None
        params = dict(model.named_parameters())
        meta = [n for n in names if params[n].device.type == "meta"]
        if meta:
            raise PrecisionError(
                f"{self.label}: parameters {meta[:3]} are on the meta device (no values); load the "
                "weights (e.g. model.to_empty(device='cpu') then load_state_dict) before attribution."
            )
        half = sorted({str(params[n].dtype) for n in names if params[n].dtype in HALF_DTYPES})
        if half:
            raise PrecisionError(
                f"{self.label}: the model has {', '.join(half)} parameters; attribution scores (differences "
                "of ~1e-4) are below half precision's resolution. Attribute a float32 copy: "
                "copy.deepcopy(model).float() (and float32 inputs)."
            )
        self._check(model, task, train_dataset, names)

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
        self.check(model, task, train_dataset)
        self.model_ = model
        self.task_ = task
        self.train_dataset_ = train_dataset
        self.train_indices_ = resolve_indices(train_dataset, train_indices, "training")
        self.cache_ = cache if cache is not None else GradientCache()
        params = dict(model.named_parameters())
        self.info = {"num_params": sum(params[n].numel() for n in select_parameters(model, self.params))}
        self.projector_ = self._projector()
        self._fit()
        self._fitted = True
        return self

    def score(self, test_dataset: Any, test_indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """Scores ``[n_test, n_train_scored]`` (CPU; ``[n_checkpoints, n_test, n_train_scored]`` for a
        ``checkpoint_indexed`` estimator), positive = the training example helps ``f(x)``."""
        if not self._fitted:
            raise NotFittedError(f"{type(self).__name__}.score() called before fit().")
        idx = resolve_indices(test_dataset, test_indices, "test")
        scores = self._score(test_dataset, idx)
        expected: tuple[int, ...] = (idx.numel(), self.train_indices_.numel())
        if self.checkpoint_indexed:
            expected = (scores.shape[0] if scores.dim() == 3 else -1, *expected)
        if tuple(scores.shape) != expected:
            raise RuntimeError(f"{self.label}: scores have shape {tuple(scores.shape)}, expected {expected}.")
        if not torch.isfinite(scores).all():
            raise NonFiniteError(
                f"{self.label}: non-finite attribution scores; check that the training data, the test data and "
                "the model weights are finite (torch.isfinite), or use more damping."
            )
        return scores.detach().cpu().contiguous()  # streamed products come transposed

    def settings(self) -> dict[str, Any]:
        """The config (``config.to_dict()``) plus the values chosen while fitting (:attr:`info`).

        A subclass written the pre-config way (its own ``__init__`` keyword arguments stored as attributes
        of the same name) also has those reported, so caches and reports still tell its settings apart.
        """
        return {"estimator": self.name, **self.config.to_dict(), **self._init_attributes(), **self.info}

    def _init_attributes(self) -> dict[str, Any]:
        parameters = inspect.signature(type(self).__init__).parameters
        if "config" in parameters:
            return {}
        skip = {"self", *self.config.field_names()}
        return {p: json_safe(getattr(self, p)) for p in parameters if p not in skip and hasattr(self, p)}

    def __repr__(self) -> str:
        defaults = type(self.config)()
        shown = [
            f"{f.name}={getattr(self.config, f.name)!r}"
            for f in dataclasses.fields(self.config)
            if getattr(self.config, f.name) != getattr(defaults, f.name)
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    # -- helpers for subclasses -----------------------------------------------------------------
    def _projector(self) -> Projector | None:
        """The one :class:`Projector` for training and test gradients (``None``: exact gradients)."""
        dim = getattr(self.config, "projection_dim", None)
        if dim is None:
            return None
        return Projector(dim, self.config.projection, self.config.projection_seed)

    def train_stream(
        self, indices: Tensor | None = None, *, at: Any = None, what: str = "training"
    ) -> GradientStream:
        """Training-loss gradients of ``train_indices`` (or ``indices``) ``[n, P']``, resident or recomputed
        per pass as the cache's budget allows (``P'``: the projected dimension when projecting; ``at``:
        parameters to take them at). ``info["train_gradients"]`` records which storage it got."""
        stream = self.cache_.stream(
            self.model_, self.task_, self.train_dataset_, self.train_indices_ if indices is None else indices,
            kind="loss", params=self.params, projection=self.projector_, at=at, what=what,
        )
        if indices is None:
            self.info["train_gradients"] = stream.storage
        return stream

    def test_matrix(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        """Measurement gradients ``g_x`` ``[n_test, P']``, held in memory (projected when projecting)."""
        return self.cache_.stream(
            self.model_, self.task_, test_dataset, test_indices,
            kind="measurement", params=self.params, projection=self.projector_, what="test",
        ).collect()

    def train_gradients(self) -> PerSampleGradients:
        """Cached per-sample training-loss gradients ``g_j`` ``[n_train, P]`` (unprojected), all in memory;
        :class:`ConfigurationError` when they do not fit the cache's budget (use :meth:`train_stream`)."""
        return self.cache_.get(
            self.model_, self.task_, self.train_dataset_, self.train_indices_,
            kind="loss", params=self.params, what="training",
        )

    def test_gradients(self, test_dataset: Any, test_indices: Tensor) -> PerSampleGradients:
        """Cached per-sample measurement gradients ``g_x`` ``[n_test, P]`` (unprojected; must fit the budget)."""
        return self.cache_.get(
            self.model_, self.task_, test_dataset, test_indices,
            kind="measurement", params=self.params, what="test",
        )

    # -- to implement ---------------------------------------------------------------------------
    def _check(  # noqa: B027 - optional hook
        self, model: nn.Module, task: AttributionTask, train_dataset: Any, names: list[str]
    ) -> None:
        """Estimator-specific cheap checks; ``names`` are the selected parameter names."""

    @abstractmethod
    def _fit(self) -> None:
        """Prepare from ``self.model_``, ``self.task_``, ``self.train_dataset_``, ``self.train_indices_``."""

    @abstractmethod
    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        """Return ``[n_test, n_train_scored]`` scores for validated ``test_indices``."""
