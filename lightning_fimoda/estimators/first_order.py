"""First-order estimators: Grad-Dot and Grad-Cos (SPEC §3).

Grad-Dot ``τ(j, x) = g_x · g_j`` is the first-order Taylor expansion of leave-one-out further training
(one gradient step of size ``lr`` changes ``f(x)`` by ``(lr/n) g_x · g_j``; the factor is dropped).
Grad-Cos normalises both gradients: ``g_x · g_j / (‖g_x‖ ‖g_j‖)`` (a zero gradient scores 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..registry import register_estimator
from .base import Estimator

__all__ = ["GradCos", "GradDot"]


@register_estimator("grad_dot")
class GradDot(Estimator):
    """``τ(j, x) = g_x · g_j``. Cost: one pass of per-sample gradients, one ``[T, P] × [P, N]`` product."""

    def _fit(self) -> None:
        self.train_gradients()

    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        return self.test_gradients(test_dataset, test_indices).flat @ self.train_gradients().flat.T


@register_estimator("grad_cos")
class GradCos(Estimator):
    """``τ(j, x) = g_x · g_j / (‖g_x‖ ‖g_j‖)``: Grad-Dot with both gradients normalised."""

    def _fit(self) -> None:
        self.train_gradients()

    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        g_test = self.test_gradients(test_dataset, test_indices).flat
        g_train = self.train_gradients().flat
        return _unit_rows(g_test) @ _unit_rows(g_train).T


def _unit_rows(x: Tensor) -> Tensor:
    norms = x.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, x / norms.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))
