"""Inverse operators over a :class:`~lightning_fimoda.curvature.CurvatureOperator` (pyDVL-style):
``Solver(config).fit(op).solve(rhs) -> (x, diagnostics)``. Importing this package registers the
built-in solvers ``explicit`` (dense eigh), ``cg``, ``lissa`` and ``arnoldi``."""

from .arnoldi import ArnoldiConfig, ArnoldiSolver, lanczos, ritz_pairs
from .base import SOLVERS, Solver, SolverConfig, register_solver, relative_residuals
from .cg import CGConfig, CGSolver
from .dense import DenseSolver, ExplicitConfig
from .lissa import LissaConfig, LissaSolver, extreme_eigenvalues

__all__ = [
    "SOLVERS",
    "ArnoldiConfig",
    "ArnoldiSolver",
    "CGConfig",
    "CGSolver",
    "DenseSolver",
    "ExplicitConfig",
    "LissaConfig",
    "LissaSolver",
    "Solver",
    "SolverConfig",
    "extreme_eigenvalues",
    "lanczos",
    "register_solver",
    "relative_residuals",
    "ritz_pairs",
]
