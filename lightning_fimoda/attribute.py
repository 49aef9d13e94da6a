"""``attribute()``: the final-model-only entry point for a model loaded from anywhere (no Trainer)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._data import resolve_indices
from .estimators.base import Estimator
from .functional import eval_mode
from .gradients import DEFAULT_MEMORY_BUDGET, GradientCache
from .registry import build_estimator
from .task import AttributionTask

__all__ = ["EstimatorRun", "attribute", "build_estimators", "run_estimators"]

EstimatorSpec = str | Estimator


@dataclass
class EstimatorRun:
    """One estimator's result: scores ``[n_test, n_train]``, wall time and settings used."""

    label: str
    scores: Tensor
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


def build_estimators(estimators: EstimatorSpec | Sequence[EstimatorSpec]) -> list[Estimator]:
    """Turn names and/or built estimators into estimators; labels must be unique."""
    if isinstance(estimators, (str, Estimator)):
        estimators = [estimators]
    built = [build_estimator(e) if isinstance(e, str) else e for e in estimators]
    for est in built:
        if not isinstance(est, Estimator):
            raise TypeError(f"Estimators must be names or Estimator instances, got {type(est).__name__}.")
    labels = [e.label for e in built]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise ValueError(f"Duplicate estimator labels {dupes}: give each a distinct label=.")
    if not built:
        raise ValueError("No estimators given.")
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
) -> list[EstimatorRun]:
    """Fit and score every estimator on one shared gradient cache, in eval mode; time each one."""
    built = build_estimators(estimators)
    train_idx = resolve_indices(train_dataset, train_indices, "training")
    test_idx = resolve_indices(test_dataset, test_indices, "test")
    if cache is None:
        cache = GradientCache(memory_budget=memory_budget, progress=progress)
    runs = []
    with eval_mode(model):
        for est in built:
            start = time.perf_counter()
            est.fit(model, task, train_dataset, train_idx, cache=cache)
            scores = est.score(test_dataset, test_idx)
            runs.append(EstimatorRun(est.label, scores, time.perf_counter() - start, est.settings()))
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
