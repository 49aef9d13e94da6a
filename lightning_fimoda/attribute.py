"""``attribute()``: the final-model-only entry point for a model loaded from anywhere (no Trainer)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._data import model_device_dtype, resolve_indices
from .estimators.base import Estimator
from .functional import eval_mode
from .gradients import DEFAULT_MEMORY_BUDGET, GradientCache
from .profiling import PeakMemory
from .registry import build_estimator
from .task import AttributionTask

__all__ = ["EstimatorRun", "attribute", "build_estimators", "run_estimators"]

EstimatorSpec = str | Mapping[str, Any] | Estimator


@dataclass
class EstimatorRun:
    """One estimator's result: scores ``[n_test, n_train]``, wall time, settings used, and the peak
    memory above the level at its start (bytes, see :class:`~lightning_fimoda.profiling.PeakMemory`;
    ``None`` when not measured)."""

    label: str
    scores: Tensor
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    peak_memory: int | None = None


def build_estimators(estimators: EstimatorSpec | Sequence[EstimatorSpec]) -> list[Estimator]:
    """Names, built estimators and ``{"name": ..., **kwargs}`` mappings → estimators (unique labels)."""
    if isinstance(estimators, (str, Mapping, Estimator)):
        estimators = [estimators]
    built = []
    for spec in estimators:
        if isinstance(spec, Mapping):
            kwargs = dict(spec)
            name = kwargs.pop("name", None)
            if not isinstance(name, str):
                raise ValueError(f"An estimator given as a mapping needs a 'name' key, got {dict(spec)}.")
            built.append(build_estimator(name, **kwargs))
        elif isinstance(spec, str):
            built.append(build_estimator(spec))
        elif isinstance(spec, Estimator):
            built.append(spec)
        else:
            raise TypeError(
                f"Estimators are names, {{'name': ...}} mappings or Estimator instances; got {type(spec).__name__}."
            )
    if not built:
        raise ValueError("No estimators given.")
    labels = [e.label for e in built]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise ValueError(f"Duplicate estimator labels {dupes}: give each a distinct label=.")
    return built


def run_estimators(
    model: nn.Module,
    task: AttributionTask,
    train_dataset: Any,
    test_dataset: Any,
    estimators: EstimatorSpec | Sequence[EstimatorSpec],
    train_indices: Sequence[int] | Tensor | None = None,
    test_indices: Sequence[int] | Tensor | None = None,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    cache: GradientCache | None = None,
    share_gradients: bool = True,
    measure_memory: bool = False,
) -> list[EstimatorRun]:
    """Fit and score every estimator in eval mode; time each one.

    ``share_gradients=True`` (default): one gradient cache (``cache``, or a new one) serves every
    estimator, so per-sample gradients are computed once. ``False``: each estimator gets a fresh cache,
    so its time and memory include the gradients it needs (a fair cost comparison).
    ``measure_memory=True`` records each estimator's peak memory (:class:`PeakMemory`).
    """
    if cache is not None and not share_gradients:
        raise ValueError("cache= is a shared gradient cache; it cannot be used with share_gradients=False.")
    built = build_estimators(estimators)
    train_idx = resolve_indices(train_dataset, train_indices, "training")
    test_idx = resolve_indices(test_dataset, test_indices, "test")
    device, _ = model_device_dtype(model)

    def new_cache() -> GradientCache:
        return GradientCache(memory_budget=memory_budget, progress=progress)

    shared = (cache if cache is not None else new_cache()) if share_gradients else None
    runs = []
    with eval_mode(model):
        for est in built:
            meter = PeakMemory(device) if measure_memory else contextlib.nullcontext()
            with meter:
                start = time.perf_counter()
                est.fit(model, task, train_dataset, train_idx, cache=shared if shared is not None else new_cache())
                scores = est.score(test_dataset, test_idx)
                seconds = time.perf_counter() - start
            peak = meter.peak_bytes if measure_memory else None
            runs.append(EstimatorRun(est.label, scores, seconds, est.settings(), peak))
    return runs


def attribute(
    model: nn.Module,
    task: AttributionTask,
    train_dataset: Any,
    test_dataset: Any,
    estimators: EstimatorSpec | Sequence[EstimatorSpec],
    train_indices: Sequence[int] | Tensor | None = None,
    test_indices: Sequence[int] | Tensor | None = None,
    **kwargs: Any,
) -> dict[str, Tensor]:
    """Attribution scores of the final ``model`` per estimator label.

    Returns ``{label: Tensor[n_test, n_train_scored]}`` with SPEC §1's sign (positive = leaving the
    training example out would raise ``f`` on the test example). Per-sample gradients are computed once
    and shared by every estimator that needs them. ``kwargs`` go to :func:`run_estimators`.
    """
    with torch.random.fork_rng(devices=[]):
        runs = run_estimators(
            model, task, train_dataset, test_dataset, estimators, train_indices, test_indices, **kwargs
        )
    return {run.label: run.scores for run in runs}
