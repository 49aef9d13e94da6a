"""``attribute()``: the final-model-only entry point for a model loaded from anywhere (no Trainer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .pipeline import EstimatorRun, EstimatorSpec, build_estimators, run_estimators
from .task import AttributionTask

__all__ = ["EstimatorRun", "attribute", "build_estimators", "run_estimators"]


def attribute(model: nn.Module, task: AttributionTask, train_dataset: Any, test_dataset: Any,
              estimators: EstimatorSpec | Sequence[EstimatorSpec], train_indices: Sequence[int] | Tensor | None = None,
              test_indices: Sequence[int] | Tensor | None = None, **kwargs: Any) -> dict[str, Tensor]:
    """Attribution scores of the final ``model`` per estimator label.

    Returns ``{label: Tensor[n_test, n_train_scored]}`` (``[n_checkpoints, n_test, n_train_scored]`` for
    a checkpoint-indexed estimator) with SPEC §1's sign (positive = leaving the training example out
    would raise ``f`` on the test example). Per-sample gradients are computed once and shared by every
    estimator that needs them. ``kwargs`` go to :func:`~lightning_fimoda.pipeline.run_estimators`
    (the same pipeline ``FiMODACallback`` uses).
    """
    with torch.random.fork_rng(devices=[]):
        runs = run_estimators(
            model, task, train_dataset, test_dataset, estimators, train_indices, test_indices, **kwargs
        )
    return {run.label: run.scores for run in runs}
