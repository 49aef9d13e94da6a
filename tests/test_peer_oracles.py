"""Settings the peer benchmark (issue 17) relies on for equal-work comparisons, against dense oracles.

- LiSSA with ``tol=0`` runs exactly ``depth`` steps with no residual checks (pyDVL's ``rtol=0``): on
  the full data it is the truncated Neumann series ``(1/s) Σ_{k=0}^{T} (I − (H + λI)/s)^k v``.
- The true-Hessian product (reverse-over-reverse) equals the dense ``torch.func`` Hessian.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_fimoda import FunctionalTask, SupervisedTask
from lightning_fimoda.curvature import CurvatureOperator
from lightning_fimoda.solvers import SOLVERS

from .helpers import dense_true_hessian, mse, trained_mlp

TASK = SupervisedTask("mse")
DAMPING, SCALE, DEPTH = 0.5, 8.0, 7


@pytest.fixture(scope="module")
def setup():
    model, train, _ = trained_mlp()
    op = CurvatureOperator(FunctionalTask(model, TASK), train, hessian="exact", damping=DAMPING)
    return op, dense_true_hessian(model, train, mse)


def test_exact_hessian_products_match_the_dense_hessian(setup):
    op, hess = setup
    v = torch.randn(3, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op.curvature(v), v @ hess, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.curvature(v[0]), hess @ v[0], rtol=1e-10, atol=1e-12)


def test_lissa_with_tol_zero_is_the_truncated_neumann_series(setup):
    op, hess = setup
    config = SOLVERS["lissa"].config_class(depth=DEPTH, batch_size=10_000, scale=SCALE, tol=0.0)
    solver = SOLVERS["lissa"](config).fit(op)
    v = torch.randn(2, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fixed number of steps was asked for: no "did not reach tol"
        x, info = solver.solve(v)
    step = torch.eye(op.num_params, dtype=torch.float64) - (hess + DAMPING * torch.eye(op.num_params,
                                                                                        dtype=torch.float64)) / SCALE
    h, term = v.clone(), v.clone()
    for _ in range(DEPTH):
        term = term @ step.T
        h = h + term
    torch.testing.assert_close(x, h / SCALE, rtol=1e-10, atol=1e-12)
    assert info["steps"] == DEPTH and info["converged"] is False and info["max_relative_residual"] > 0


def test_lissa_tol_must_not_be_negative():
    with pytest.raises(ValueError, match="tol"):
        SOLVERS["lissa"].config_class(tol=-1.0)
