"""First-order estimators: Grad-Dot and Grad-Cos (SPEC §3).

Grad-Dot ``τ(j, x) = g_x · g_j`` is the first-order Taylor expansion of leave-one-out further training
(one gradient step of size ``lr`` changes ``f(x)`` by ``(lr/n) g_x · g_j``; the factor is dropped).
Grad-Cos normalises both gradients: ``g_x · g_j / (‖g_x‖ ‖g_j‖)`` (a zero gradient scores 0).

The test gradients ``[T, P']`` are held in memory; the training gradients stream past them in chunks
(:meth:`~lightning_fimoda.estimators.base.Estimator.train_stream`), so memory stays within the
gradient cache's budget. With ``projection_dim=d`` both sides are projected by one seeded random
projection ``Π`` (``P' = d``): ``(Π g_x)·(Π g_j)`` equals ``g_x·g_j`` in expectation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..gradients import streamed_cosines, streamed_products
from ..registry import register_estimator
from .base import Estimator
from .config import ProjectionConfig

__all__ = ["GradCos", "GradDot"]


@register_estimator("grad_dot")
class GradDot(Estimator):
    """``τ(j, x) = g_x · g_j``. Cost: one pass of per-sample gradients, one ``[T, P'] × [P', N]`` product.

    Settings: :class:`~lightning_fimoda.estimators.config.ProjectionConfig`.
    """

    config_class = ProjectionConfig

    def _fit(self) -> None:
        self._train = self.train_stream()

    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        return streamed_products(self._train, self.test_matrix(test_dataset, test_indices).T).T


@register_estimator("grad_cos")
class GradCos(Estimator):
    """``τ(j, x) = g_x · g_j / (‖g_x‖ ‖g_j‖)``: Grad-Dot with both gradients normalised (one pass).

    Settings: :class:`~lightning_fimoda.estimators.config.ProjectionConfig`.
    """

    config_class = ProjectionConfig

    def _fit(self) -> None:
        self._train = self.train_stream()

    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        unit_test = _unit_rows(self.test_matrix(test_dataset, test_indices))  # [T, P']
        return streamed_cosines(self._train, unit_test.T).T


def _unit_rows(x: Tensor) -> Tensor:
    norms = x.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, x / norms.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))
