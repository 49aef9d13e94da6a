"""Dense solve: materialise ``H + λI`` ``[P, P]`` and eigendecompose it once (tiny models; the reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..curvature import CurvatureOperator
from ..exceptions import ConfigurationError
from .base import Solver, SolverConfig, register_solver

__all__ = ["DenseSolver", "ExplicitConfig"]


@dataclass(frozen=True)
class ExplicitConfig(SolverConfig):
    """Args: max_params: refuse models with more selected parameters than this (memory ``P²``)."""

    max_params: int = 5000

    def __post_init__(self) -> None:
        self._integer("max_params")


@register_solver("explicit")
class DenseSolver(Solver):
    """``(H + λI)^{-1} = U diag(1/e) Uᵀ`` from ``eigh``.

    ``H + λI`` may be indefinite (true Hessian, small ``λ``): the exact inverse is still used; a
    (numerically) singular matrix raises. ``info`` reports its extreme eigenvalues.
    """

    config_class = ExplicitConfig

    def check(self, num_params: int) -> None:
        if num_params > self.config.max_params:
            raise ConfigurationError(
                f"{self.label}: the model has P = {num_params} selected parameters, above max_params = "
                f"{self.config.max_params} (a dense [P, P] matrix). Use 'cg', 'lissa' or 'arnoldi', select "
                "fewer parameters with params=, or raise max_params."
            )

    def _prepare(self, op: CurvatureOperator) -> None:
        evals, evecs = torch.linalg.eigh(op.dense())
        largest = evals.abs().max()
        if evals.abs().min() <= largest * op.num_params * torch.finfo(evals.dtype).eps:
            raise ConfigurationError(f"{self.label}: H + λI is singular (eigenvalue ~0); increase damping.")
        self._evals, self._evecs = evals, evecs
        self.info = {"min_eigenvalue": evals.min().item(), "max_eigenvalue": evals.max().item()}

    def _solve(self, op: CurvatureOperator, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        return ((rhs @ self._evecs) / self._evals) @ self._evecs.T, {"method": "eigh"}
