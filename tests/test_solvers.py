"""Solvers over the curvature operator, the Lanczos helper, the curvature registry and LiSSA's
eigenvalue-based scale, residual stopping and definiteness check, against dense oracles."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_fimoda import FunctionalTask, SupervisedTask, build_estimator
from lightning_fimoda.curvature import (
    CurvatureOperator,
    CurvatureType,
    available_curvatures,
    register_curvature,
)
from lightning_fimoda.curvature import types as curvature_types
from lightning_fimoda.curvature.types import ExactHessian
from lightning_fimoda.exceptions import ConfigurationError
from lightning_fimoda.solvers import SOLVERS, CGSolver, LissaSolver, lanczos, ritz_pairs

from .conftest import make_mlp, make_regression
from .helpers import dense_true_hessian, mse, row_cosine, trained_mlp

MSE = SupervisedTask("mse")


@pytest.fixture(scope="module")
def setup():
    return trained_mlp()


def operator(model, data, **kwargs) -> CurvatureOperator:
    return CurvatureOperator(FunctionalTask(model, MSE), data, **kwargs)


def test_lanczos_tridiagonalises_the_operator():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    a = a + a.T
    alphas, betas, basis = lanczos(lambda v: a @ v, 12, 6, 3, torch.float64, "cpu")
    tri = torch.diag(alphas) + torch.diag(betas[:5], 1) + torch.diag(betas[:5], -1)
    torch.testing.assert_close(basis @ basis.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(basis @ a @ basis.T, tri, rtol=0, atol=1e-10)
    evals, vecs, residuals = ritz_pairs(*lanczos(lambda v: a @ v, 12, 12, 3, torch.float64, "cpu"))
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(a), rtol=0, atol=1e-10)
    torch.testing.assert_close(vecs @ a, evals[:, None] * vecs, rtol=0, atol=1e-9)
    assert residuals.max() < 1e-8


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_inverts_the_damped_operator(setup, name):
    model, train, _ = setup
    op = operator(model, train, hessian="exact", damping=0.5)
    kwargs = {"rank": 1000} if name == "arnoldi" else {"tol": 1e-9} if name == "cg" else {}
    solver = SOLVERS[name](SOLVERS[name].config_class(**kwargs)).fit(op)
    rhs = torch.randn(3, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x, diagnostics = solver.solve(rhs)
    expected = torch.linalg.solve(dense_true_hessian(model, train, mse) + 0.5 * torch.eye(op.num_params,
                                  dtype=torch.float64), rhs.T).T
    tol = 2e-2 if name == "lissa" else 1e-6  # LiSSA stops at a relative residual of 1e-2
    torch.testing.assert_close(x, expected, rtol=tol, atol=tol * expected.abs().max().item())
    assert isinstance(diagnostics, dict)


def test_a_registered_curvature_type_is_selectable_by_name(monkeypatch):
    monkeypatch.setattr(curvature_types, "_CURVATURES", dict(curvature_types._CURVATURES))  # undone after

    @register_curvature("doubled_exact")
    class Doubled(ExactHessian):
        def batch_product(self, op, batch, tangents):
            return 2.0 * super().batch_product(op, batch, tangents)

    assert issubclass(Doubled, CurvatureType) and "doubled_exact" in available_curvatures()
    model, train, test = make_mlp(d_in=3, hidden=3), make_regression(10, d_in=3), make_regression(3, d_in=3)
    doubled = build_estimator("explicit", hessian="doubled_exact", damping=1.0).fit(model, MSE, train).score(test)
    # (2H + 1·I)^{-1} = ½ (H + ½ I)^{-1}
    half = build_estimator("explicit", hessian="exact", damping=0.5).fit(model, MSE, train).score(test)
    torch.testing.assert_close(doubled, 0.5 * half, rtol=1e-8, atol=1e-12)


def test_default_lissa_agrees_with_cg_and_reaches_its_residual_tolerance():
    """Issue 12.11: a well-conditioned tiny float64 problem with more examples than LiSSA's batch size.
    The old ladder accepted a scale at the edge of stability (residual 0.08, min cosine 0.995)."""
    model = make_mlp(d_in=3, hidden=5)
    train, test = make_regression(300, d_in=3, seed=1), make_regression(5, d_in=3, seed=2)
    x, y = train.tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        mse(model(x), y).mean().backward()
        opt.step()
    cg = build_estimator("cg", tol=1e-10).fit(model, MSE, train).score(test)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = build_estimator("lissa").fit(model, MSE, train)
        scores = est.score(test)
    assert (row_cosine(scores, cg) > 0.999).all()
    assert est.info["solver"]["converged"] is True and est.info["solver"]["max_relative_residual"] <= 1e-2
    assert est.info["lissa_scale"] == pytest.approx(1.1 * est.info["lissa_lambda_max"])


def test_lissa_refuses_an_indefinite_exact_hessian_like_cg(setup):
    """Issue 13.6: H has eigenvalues down to −0.019 here; with λ = 0.01, H + λI is indefinite."""
    model, train, test = setup
    for name in ("cg", "lissa"):
        with pytest.raises(ConfigurationError, match="not positive definite"):
            build_estimator(name, hessian="exact", damping=0.01).fit(model, MSE, train).score(test)
    est = build_estimator("lissa", hessian="exact", damping=0.5).fit(model, MSE, train)
    assert est.info["lissa_lambda_min"] > 0


def test_lissa_warns_when_the_depth_cap_is_hit_and_reports_the_residual(setup):
    model, train, test = setup
    est = build_estimator("lissa", damping=0.05, depth=20).fit(model, MSE, train)
    with pytest.warns(RuntimeWarning, match=r"reached depth=20 before the relative residual tol=0.01.*residual"):
        est.score(test)
    diag = est.info["solver"]
    assert diag["converged"] is False and diag["steps"] == 20 and diag["max_relative_residual"] > 1e-2


def test_solver_before_fit_and_lissa_fixed_scale(setup):
    model, train, _ = setup
    with pytest.raises(RuntimeError, match="before fit"):
        CGSolver().solve(torch.zeros(1, 3))
    op = operator(model, train, damping=0.5)
    solver = LissaSolver(scale=50.0, depth=5000).fit(op)
    x, diag = solver.solve(torch.ones(1, op.num_params, dtype=torch.float64))
    assert diag["scale"] == 50.0 and diag["converged"] and diag["max_relative_residual"] <= 1e-2
    assert isinstance(train, TensorDataset)


def test_lissa_moves_up_the_scale_ladder_when_the_recursion_diverges(setup, monkeypatch):
    import lightning_fimoda.solvers.lissa as lissa

    monkeypatch.setattr(lissa, "SCALE_MARGIN", 0.3)  # 0.3·λ_max: the top eigen-direction diverges
    model, train, test = setup
    est = build_estimator("lissa", damping=0.5).fit(model, MSE, train)
    scores = est.score(test)
    tried, lam_max = est.info["lissa_scales_tried"], est.info["lissa_lambda_max"]
    assert tried == pytest.approx([0.3 * lam_max, 0.6 * lam_max]) and est.info["lissa_scale"] == tried[-1]
    cg = build_estimator("cg", damping=0.5, tol=1e-10).fit(model, MSE, train).score(test)
    assert (row_cosine(scores, cg) > 0.999).all()


def _products(monkeypatch) -> list[tuple[int, int]]:
    """Records ``(examples, rows)`` of every curvature product from now on."""
    calls: list[tuple[int, int]] = []
    original = CurvatureOperator.curvature

    def counting(self, v):
        calls.append((self.n, 1 if v.dim() == 1 else v.shape[0]))
        return original(self, v)

    monkeypatch.setattr(CurvatureOperator, "curvature", counting)
    return calls


def test_lissa_scale_comes_from_mini_batch_probes_only_for_gauss_newton(setup, monkeypatch):
    """Issue 14: the old fit ran a 30-step full-data Lanczos (30 passes over all n) for the scale. The
    probes cost PROBE_BATCHES · PROBE_STEPS products on B examples, and their largest Ritz value bounds
    the full-data λ_max(H + λI) (convexity, module doc; here the max over the probes is above it)."""
    import lightning_fimoda.solvers.lissa as lissa

    model, train, _ = setup
    op = operator(model, train, damping=0.5)
    calls = _products(monkeypatch)
    solver = LissaSolver(batch_size=10).fit(op)
    assert calls == [(10, 1)] * (lissa.PROBE_BATCHES * lissa.PROBE_STEPS)
    lam_max = torch.linalg.eigvalsh(op.dense()).max().item()
    assert lam_max <= solver.info["lissa_lambda_max"] and "lissa_lambda_min" not in solver.info
    calls.clear()
    LissaSolver(batch_size=100).fit(op)  # batch = all examples: one probe of the full data
    assert calls == [(30, 1)] * lissa.PROBE_STEPS


def test_lissa_check_definite_false_skips_the_full_data_proof(setup, monkeypatch):
    import lightning_fimoda.solvers.lissa as lissa

    model, train, _ = setup
    op = operator(model, train, hessian="exact", damping=0.5)
    calls = _products(monkeypatch)
    proved = LissaSolver(batch_size=10).fit(op)
    assert calls.count((30, 1)) == min(op.num_params, lissa.LANCZOS_STEPS) and proved.info["lissa_lambda_min"] > 0
    calls.clear()
    solver = LissaSolver(batch_size=100, check_definite=False).fit(op)
    assert calls == [(30, 1)] * lissa.PROBE_STEPS and "lissa_lambda_min" not in solver.info
    rhs = torch.randn(3, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = torch.linalg.solve(op.dense(), rhs.T).T
    x, _ = solver.solve(rhs)
    torch.testing.assert_close(x, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    indefinite = operator(model, train, hessian="exact", damping=0.01)  # eigenvalues down to −0.009
    LissaSolver(check_definite=False, depth=50, tol=0.0).fit(indefinite)  # no proof: no ConfigurationError


def test_lissa_unconverged_repeats_without_a_residual_warn(setup):
    """``repeat > 1`` with ``residual_examples=0``: no residual exists; the depth warning says so (it
    formatted ``None`` and raised TypeError)."""
    model, train, _ = setup
    op = operator(model, train, damping=0.5)
    rhs = torch.randn(2, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    solver = LissaSolver(batch_size=10, depth=5, repeat=2, tol=1e-12, residual_examples=0).fit(op)
    with pytest.warns(RuntimeWarning, match=r"max relative residual not computed \(residual_examples=0\)"):
        x, diag = solver.solve(rhs)
    assert diag["max_relative_residual"] is None and diag["converged"] is False and torch.isfinite(x).all()


def test_lissa_residual_costs_at_most_one_full_data_pass(setup, monkeypatch):
    """Issue 14: the old solve recomputed the full-data residual after the recursion's last check."""
    model, train, _ = setup
    op = operator(model, train, damping=0.5)
    rhs = torch.randn(4, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    calls = _products(monkeypatch)
    cases = [({"tol": 1e-12}, [(30, 4)] * 2, 30),  # checks at steps 12 and 20 (check_every = 12), no more
             ({"tol": 0.0}, [(30, 4)], 30),  # no checks: one pass for the reported residual
             ({"tol": 0.0, "residual_examples": 7}, [(7, 4)], 7),
             ({"tol": 0.0, "residual_examples": 0}, [], 0)]
    for kwargs, full, examples in cases:
        solver = LissaSolver(batch_size=10, depth=20, **kwargs).fit(op)
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # tol=1e-12 is not reached in 20 steps
            x, diag = solver.solve(rhs)
        assert [c for c in calls if c[0] != 10] == full and len(calls) == 20 + len(full), kwargs
        assert diag["residual_examples"] == examples
        if examples == 30:
            dense = op.dense()
            want = ((x @ dense - rhs).norm(dim=1) / rhs.norm(dim=1)).max().item()
            assert diag["max_relative_residual"] == pytest.approx(want, rel=1e-9)
        elif examples == 0:
            assert diag["max_relative_residual"] is None
