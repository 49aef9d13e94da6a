"""Arnoldi against a dense oracle: the true Hessian of a tiny float64 MLP (``torch.func.hessian``), its
eigendecomposition, and both variants of the low-rank inverse (issue 17):

- ``complement=False`` (dattri, pyDVL, captum): ``Σ_{top-k} u uᵀ v / (e + λ)``;
- ``complement=True`` (default): that plus ``(I − UUᵀ) v / λ`` (``H`` taken as 0 off the top-k subspace).
"""

from __future__ import annotations

import pytest
import torch

from lightning_fimoda import FunctionalTask, SupervisedTask, build_estimator
from lightning_fimoda.curvature import CurvatureOperator
from lightning_fimoda.exceptions import ConfigurationError
from lightning_fimoda.solvers import SOLVERS

from .helpers import dense_true_hessian, mse, trained_mlp
from .test_influence import per_example_grads

TASK = SupervisedTask("mse")
RANK, DAMPING = 4, 0.05


@pytest.fixture(scope="module")
def setup():
    model, train, test = trained_mlp()  # P = 26, not stationary: H is indefinite
    hess = dense_true_hessian(model, train, mse)
    evals, evecs = torch.linalg.eigh(hess)
    top = evals.abs().argsort(descending=True)[:RANK]  # Arnoldi keeps the largest |e|
    return model, train, test, evals[top], evecs[:, top]


def oracle(rhs, evals, vecs, damping, complement):
    """Dense low-rank inverse applied to the rows of ``rhs`` ``[k, P]``."""
    coeff = rhs @ vecs  # [k, r]
    inside = (coeff / (evals + damping)) @ vecs.T
    return inside + (rhs - coeff @ vecs.T) / damping if complement else inside


@pytest.mark.parametrize("complement", [False, True])
def test_solver_matches_the_dense_eigendecomposition(setup, complement):
    model, train, _, evals, vecs = setup
    op = CurvatureOperator(FunctionalTask(model, TASK), train, hessian="exact", damping=DAMPING)
    config = SOLVERS["arnoldi"].config_class(rank=RANK, iterations=op.num_params, complement=complement)
    solver = SOLVERS["arnoldi"](config).fit(op)
    torch.testing.assert_close(solver.eigenvalues.sort().values, evals.sort().values, rtol=1e-9, atol=1e-10)
    rhs = torch.randn(3, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x, _ = solver.solve(rhs)
    expected = oracle(rhs, evals, vecs, DAMPING, complement)
    torch.testing.assert_close(x, expected, rtol=1e-8, atol=1e-8 * expected.abs().max().item())


@pytest.mark.parametrize("complement", [False, True])
def test_estimator_scores_match_the_dense_oracle(setup, complement):
    """Scores ``(1/n) g_j · x(g_x)`` with the default Krylov dimension (``min(P, 2·rank + 20)``, all
    26 here) against the dense oracle applied to per-example gradients."""
    model, train, test, evals, vecs = setup
    est = build_estimator("arnoldi", hessian="exact", rank=RANK, damping=DAMPING, complement=complement)
    scores = est.fit(model, TASK, train).score(test)
    g_train, g_test = per_example_grads(model, train), per_example_grads(model, test)
    expected = oracle(g_test, evals, vecs, DAMPING, complement) @ g_train.T / len(train)
    torch.testing.assert_close(scores, expected, rtol=1e-7, atol=1e-7 * expected.abs().max().item())


def test_without_the_complement_the_subspace_is_all_that_is_scored(setup):
    """A direction orthogonal to the kept eigenvectors gives 0 without the complement, ``v/λ`` with it."""
    model, train, _, evals, vecs = setup
    op = CurvatureOperator(FunctionalTask(model, TASK), train, hessian="exact", damping=DAMPING)
    v = torch.randn(1, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    v = v - (v @ vecs) @ vecs.T
    for complement, expected in ((False, torch.zeros_like(v)), (True, v / DAMPING)):
        config = SOLVERS["arnoldi"].config_class(rank=RANK, iterations=op.num_params, complement=complement)
        x, _ = SOLVERS["arnoldi"](config).fit(op).solve(v)
        torch.testing.assert_close(x, expected, rtol=1e-8, atol=1e-8 / DAMPING)


def test_complement_needs_damping_and_a_flag():
    model, train, _ = trained_mlp()
    with pytest.raises(ConfigurationError, match="needs damping > 0"):
        build_estimator("arnoldi", hessian="exact", damping=0.0, rank=RANK).fit(model, TASK, train)
    with pytest.raises(ValueError, match="complement must be True or False"):
        build_estimator("arnoldi", complement="no")
