"""Conjugate gradient on the full-data operator, one right-hand side per row, all run together."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..curvature import CurvatureOperator
from ..exceptions import ConfigurationError
from .base import Solver, SolverConfig, register_solver, relative_residuals

__all__ = ["CGConfig", "CGSolver"]


@dataclass(frozen=True)
class CGConfig(SolverConfig):
    """Args:
    tol: stop a row when ``‖(H + λI) x − b‖ ≤ tol · ‖b‖``.
    max_iter: iteration limit; rows not converged by then are returned as they stand (truncated CG,
        itself a regularised solve) with a ``RuntimeWarning``.
    """

    tol: float = 1e-6
    max_iter: int = 500

    def __post_init__(self) -> None:
        self._number("tol", strict=True)
        self._integer("max_iter")


@register_solver("cg")
class CGSolver(Solver):
    """CG needs ``H + λI`` positive definite; a non-positive curvature direction raises
    :class:`~lightning_fimoda.exceptions.ConfigurationError` (use ``hessian="gauss_newton"`` or more
    damping). Diagnostics: ``converged``, ``iterations``, ``max_relative_residual``."""

    config_class = CGConfig

    def _solve(self, op: CurvatureOperator, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        tol, max_iter = self.config.tol, self.config.max_iter
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        p = r.clone()
        rs = (r * r).sum(dim=1)
        target = (tol * rhs.norm(dim=1)) ** 2
        active = rs > target
        iterations = 0
        while active.any() and iterations < max_iter:
            idx = active.nonzero().squeeze(1)
            p_a = p[idx]
            ap = op.apply(p_a)
            pap = (p_a * ap).sum(dim=1)
            if (pap <= 0).any():
                raise ConfigurationError(
                    f"{self.label}: H + λI is not positive definite along a CG direction "
                    f"(pᵀ(H+λI)p = {pap.min().item():.3g}); use hessian='gauss_newton' or more damping."
                )
            alpha = rs[idx] / pap
            x[idx] += alpha.unsqueeze(1) * p_a
            r[idx] -= alpha.unsqueeze(1) * ap
            rs_new = (r[idx] * r[idx]).sum(dim=1)
            p[idx] = r[idx] + (rs_new / rs[idx]).unsqueeze(1) * p_a
            rs[idx] = rs_new
            active[idx] = rs_new > target[idx]
            iterations += 1
        relative = relative_residuals(op, x, rhs)
        converged = not bool(active.any())
        if not converged:
            warnings.warn(
                f"{self.label}: CG did not converge in max_iter={max_iter} iterations for "
                f"{int(active.sum())} of {rhs.shape[0]} right-hand sides (max relative residual "
                f"{relative.max().item():.3g} > tol={tol}); raise max_iter or damping.",
                RuntimeWarning,
                stacklevel=3,
            )
        return x, {"converged": converged, "iterations": iterations, "max_relative_residual": relative.max().item()}
