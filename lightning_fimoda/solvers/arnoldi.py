"""Low-rank inverse from the top eigenpairs of ``H`` (Lanczos = Arnoldi for a symmetric operator).

:func:`lanczos` is the reusable Krylov step (tridiagonal coefficients and orthonormal basis), e.g. for
matrix functions ``φ(H) v ≈ ‖v‖ Q φ(T) e_1`` started at ``v``; :func:`ritz_pairs` turns its output into
eigenpairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..curvature import CurvatureOperator
from ..exceptions import ConfigurationError
from .base import Solver, SolverConfig, register_solver

__all__ = ["ArnoldiConfig", "ArnoldiSolver", "lanczos", "ritz_pairs"]


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    num_params: int,
    steps: int,
    seed: int | Tensor,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``steps`` Lanczos steps of a symmetric operator with full re-orthogonalisation.

    Args:
        matvec: ``v [P] ↦ A v [P]``. seed: seed of a Gaussian start vector, or the start vector ``[P]``.

    Returns ``(alphas [m], betas [m], basis [m, P])`` with ``Qᵀ A Q = T = tridiag(betas[:m−1], alphas,
    betas[:m−1])`` and ``betas[m−1]`` the norm of the residual after the last step (``m ≤ steps``: fewer,
    with a zero last beta, when the Krylov space becomes invariant).
    """
    if isinstance(seed, Tensor):
        q = seed.to(device=device, dtype=dtype)
    else:
        gen = torch.Generator().manual_seed(int(seed))
        q = torch.randn(num_params, generator=gen, dtype=dtype).to(device)
    basis = q.new_empty(steps, num_params)  # rows written in place: no re-stacking of the basis per step
    basis[0] = q / q.norm()
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    scale = q.new_zeros(())
    for k in range(steps):
        q, q_mat = basis[k], basis[: k + 1]
        w = matvec(q)
        alpha = q @ w
        alphas.append(alpha)
        for _pass in range(2):  # classical Gram-Schmidt twice: orthogonal to working precision
            w = w - (q_mat @ w) @ q_mat
        beta = w.norm()
        scale = torch.maximum(scale, alpha.abs() + beta)
        if beta <= scale * 1e3 * torch.finfo(dtype).eps:
            betas.append(beta.new_zeros(()))
            break
        betas.append(beta)
        if k + 1 < steps:
            basis[k + 1] = w / beta
    m = len(alphas)
    return torch.stack(alphas), torch.stack(betas), basis if m == steps else basis[:m].clone()


def ritz_pairs(alphas: Tensor, betas: Tensor, basis: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenvalues ``[m]``, unit eigenvectors as rows ``[m, P]`` and residual norms ``[m]`` of the
    Ritz pairs of a :func:`lanczos` run."""
    m = alphas.numel()
    tri = torch.diag(alphas)
    if m > 1:
        tri = tri + torch.diag(betas[: m - 1], 1) + torch.diag(betas[: m - 1], -1)
    evals, s = torch.linalg.eigh(tri)
    return evals, s.T @ basis, (betas[m - 1] * s[-1]).abs()


@dataclass(frozen=True)
class ArnoldiConfig(SolverConfig):
    """Args: rank: eigenpairs kept. iterations: Krylov dimension (default ``min(P, 2·rank + 20)``).
    seed: seed of the start vector. complement: add ``(v − UUᵀv)/λ`` (``H`` taken as 0 outside the
    kept eigenvectors; needs ``λ > 0``); ``False`` inverts in the rank-``k`` subspace only, as the
    Arnoldi of dattri, pyDVL and captum do."""

    rank: int = 50
    iterations: int | None = None
    seed: int = 0
    complement: bool = True

    def __post_init__(self) -> None:
        self._integer("rank")
        self._integer("iterations", optional=True)
        self._integer("seed", minimum=0)
        self._flag("complement")
        if self.iterations is not None and self.iterations < self.rank:
            self._fail(f"iterations ({self.iterations}) must be >= rank ({self.rank}).")


@register_solver("arnoldi")
class ArnoldiSolver(Solver):
    """``(H + λI)^{-1} v ≈ Σ_i u_i (u_iᵀ v) / (e_i + λ) + (v − U Uᵀ v) / λ`` over the ``rank`` Ritz pairs
    ``(e_i, u_i)`` of largest magnitude of the undamped ``H``: ``H`` is treated as 0 on the complement
    (so large damping gives Grad-Dot's direction, and ``rank = P`` is exact). Needs ``λ > 0``.
    With ``complement=False`` the second term is dropped: ``U (E + λ)^{-1} Uᵀ v``, the inverse of
    ``H + λI`` restricted to the top-``rank`` subspace (``v``'s part outside it scores 0).

    ``info["arnoldi"]`` reports the kept eigenvalues' range and the largest relative Ritz residual.
    """

    config_class = ArnoldiConfig

    def _prepare(self, op: CurvatureOperator) -> None:
        if self.config.complement and op.damping <= 0:
            raise ConfigurationError(f"{self.label}: arnoldi needs damping > 0 (the complement is scaled by 1/λ).")
        rank = self.config.rank
        iterations = self.config.iterations
        steps = min(op.num_params, iterations if iterations is not None else 2 * rank + 20)
        evals, vecs, residuals = ritz_pairs(
            *lanczos(op.curvature, op.num_params, steps, self.config.seed, op.dtype, op.device)
        )
        keep = evals.abs().argsort(descending=True)[: min(rank, evals.numel())]
        self.eigenvalues, self.eigenvectors = evals[keep], vecs[keep]
        if ((self.eigenvalues + op.damping).abs() <= op.damping * 1e-8).any():
            raise ConfigurationError(f"{self.label}: H + λI is singular in the Krylov subspace; change damping.")
        self.info = {"arnoldi": {
            "rank": int(keep.numel()),
            "iterations": int(evals.numel()),
            "max_eigenvalue": self.eigenvalues.max().item(),
            "min_kept_eigenvalue": self.eigenvalues.min().item(),
            "max_relative_ritz_residual": (residuals[keep] / self.eigenvalues.abs().clamp_min(1e-300)).max().item(),
        }}

    def _solve(self, op: CurvatureOperator, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        lam = op.damping
        coeff = rhs @ self.eigenvectors.T  # [k, r]
        inside = (coeff / (self.eigenvalues + lam)) @ self.eigenvectors
        if self.config.complement:
            inside = inside + (rhs - coeff @ self.eigenvectors) / lam
        return inside, {"rank": int(self.eigenvalues.numel())}
