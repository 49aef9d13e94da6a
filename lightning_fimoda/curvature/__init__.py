"""Curvature of the empirical risk as an operator (``(H + λI) V``), with the curvature type (exact
Hessian, Gauss-Newton, or a registered one) orthogonal to the solvers that use it."""

from .gauss_newton import GaussNewton, checked_output_hessian
from .operator import DEFAULT_JACOBIAN_BUDGET, CurvatureOperator
from .types import (
    HESSIAN_ALIASES,
    CurvatureType,
    ExactHessian,
    available_curvatures,
    register_curvature,
    resolve_hessian,
)

__all__ = [
    "DEFAULT_JACOBIAN_BUDGET",
    "HESSIAN_ALIASES",
    "CurvatureOperator",
    "CurvatureType",
    "ExactHessian",
    "GaussNewton",
    "available_curvatures",
    "checked_output_hessian",
    "register_curvature",
    "resolve_hessian",
]
