"""Influence-function solvers against dense solves, exact leave-one-out refits and Grad-Dot."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad, jacrev
from torch.utils.data import TensorDataset

from lightning_fimoda import SupervisedTask, attribute, build_estimator
from lightning_fimoda.estimators.influence import SolverDivergenceError

from .helpers import dense_gauss_newton, dense_true_hessian, flat_model, mse, trained_mlp

# chunk_size 15: full-data products run over two forward passes (and, on this CPU build, tiny float64
# products over more than 16 examples hit a slow BLAS path)
SOLVERS = {
    "explicit": {"chunk_size": 15},
    "cg": {"tol": 1e-10, "chunk_size": 15},
    "lissa": {"batch_size": 1000, "depth": 150, "chunk_size": 15},  # full batch: deterministic recursion
    "arnoldi": {"rank": 1000, "chunk_size": 15},  # rank = P: exact
}
TASK = SupervisedTask("mse")


def per_example_grads(model: nn.Module, data: TensorDataset, theta: Tensor | None = None) -> Tensor:
    theta0, call = flat_model(model)
    x, y = data.tensors
    return jacrev(lambda th: mse(call(th, x), y))(theta0 if theta is None else theta)


def dense_curvature(model: nn.Module, train: TensorDataset, hessian: str) -> Tensor:
    if hessian == "exact":
        return dense_true_hessian(model, train, mse)
    out_h = lambda o, y: 2 * torch.eye(o.shape[1], dtype=o.dtype).expand(len(o), o.shape[1], o.shape[1])  # noqa: E731
    return dense_gauss_newton(model, train, out_h)


def dense_scores(model, train, test, hessian, damping, train_idx=None, generalized=False) -> Tensor:
    """``(1/n) g_x (H + λI)^{-1} g_jᵀ`` by a dense solve, computed independently of the package."""
    h = dense_curvature(model, train, hessian) + damping * torch.eye(sum(p.numel() for p in model.parameters()),
                                                                      dtype=torch.float64)
    n = len(train)
    theta0, call = flat_model(model)
    g_train = per_example_grads(model, train)
    if generalized:
        x, y = train.tensors
        risk = grad(lambda th: mse(call(th, x), y).mean())(theta0)
        g_train = per_example_grads(model, train, theta0 - torch.linalg.solve(h, risk))
    if train_idx is not None:
        g_train = g_train[train_idx]
    return per_example_grads(model, test) @ torch.linalg.solve(h, g_train.T) / n


def row_cosine(a: Tensor, b: Tensor) -> Tensor:
    return nn.functional.cosine_similarity(a, b, dim=1)


def scores_of(name: str, model, train, test, train_idx=None, **kwargs) -> tuple[Tensor, dict]:
    est = build_estimator(name, **{**SOLVERS.get(name, {}), **kwargs})
    est.fit(model, TASK, train, train_idx)
    return est.score(test), est.settings()


@pytest.fixture(scope="module")
def setup():
    return trained_mlp()


@pytest.mark.parametrize("hessian", ["gauss_newton", "exact"])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_solver_matches_the_dense_oracle(setup, solver, hessian):
    model, train, test = setup
    oracle = dense_scores(model, train, test, hessian, damping=0.5)
    scores, settings = scores_of(solver, model, train, test, hessian=hessian, damping=0.5)
    assert (row_cosine(scores, oracle) > 0.99).all()
    ratio = scores.norm(dim=1) / oracle.norm(dim=1)
    assert ((ratio > 0.99) & (ratio < 1.01)).all(), ratio
    if solver != "lissa":
        torch.testing.assert_close(scores, oracle, rtol=1e-6, atol=1e-9)
    assert settings["damping"] == 0.5 and settings["hessian"] == hessian


def test_true_and_gauss_newton_differ_off_a_minimum(setup):
    model, train, test = setup
    gn, _ = scores_of("explicit", model, train, test, damping=0.05)
    true, _ = scores_of("explicit", model, train, test, damping=0.05, hessian="exact")
    assert (gn - true).abs().max() > 1e-3 * gn.abs().max()


def test_default_damping_is_c_times_mean_squared_gradient_entry(setup):
    model, train, test = setup
    lambda_g = per_example_grads(model, train).pow(2).mean().item()
    scores, settings = scores_of("cg", model, train, test)
    assert settings["lambda_G"] == pytest.approx(lambda_g, rel=1e-12)
    assert settings["damping"] == pytest.approx(100 * lambda_g, rel=1e-12)
    torch.testing.assert_close(scores, dense_scores(model, train, test, "gauss_newton", 100 * lambda_g))
    _, settings = scores_of("cg", model, train, test, damping_scale=3.0)
    assert settings["damping"] == pytest.approx(3 * lambda_g, rel=1e-12)


@pytest.mark.parametrize("solver", ["explicit", "cg", "arnoldi"])
def test_fewer_scored_training_examples_solve_for_them_with_the_full_data_curvature(setup, solver):
    model, train, test = setup
    idx = torch.tensor([3, 17, 8])
    scores, settings = scores_of(solver, model, train, test, train_idx=idx, damping=0.5)
    assert settings["solved_for"] == "train" and scores.shape == (6, 3)
    torch.testing.assert_close(scores, dense_scores(model, train, test, "gauss_newton", 0.5, train_idx=idx))


def least_squares(n: int = 80, d: int = 3, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 + 0.5 * torch.randn(n, generator=g,
                                                                                          dtype=torch.float64)
    x_test = torch.randn(10, d, generator=g, dtype=torch.float64)
    y_test = x_test.sum(dim=1) + torch.randn(10, generator=g, dtype=torch.float64)
    return x, y, x_test, y_test


def fit_linear(x: Tensor, y: Tensor) -> Tensor:
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return torch.linalg.lstsq(design, y.unsqueeze(1)).solution[:, 0]


def linear_model(w: Tensor) -> nn.Module:
    model = nn.Linear(len(w) - 1, 1).double()
    with torch.no_grad():
        model.weight.copy_(w[:-1].unsqueeze(0))
        model.bias.copy_(w[-1:])
    return model


def test_exact_leave_one_out_refits_on_least_squares():
    x, y, x_test, y_test = least_squares()
    w = fit_linear(x, y)
    test_loss = lambda w_: (x_test @ w_[:-1] + w_[-1] - y_test).pow(2)  # noqa: E731
    loo = torch.stack([test_loss(fit_linear(x[torch.arange(len(x)) != j], y[torch.arange(len(x)) != j]))
                       for j in range(len(x))], dim=1) - test_loss(w).unsqueeze(1)  # [T, n]
    model, train, test = linear_model(w), TensorDataset(x, y), TensorDataset(x_test, y_test)
    for solver in SOLVERS:
        for hessian in ("gauss_newton", "exact"):
            kwargs = {"depth": 200} if solver == "lissa" else {}
            scores, _ = scores_of(solver, model, train, test, hessian=hessian, damping=1e-8, **kwargs)
            assert (row_cosine(scores, loo) > 0.98).all(), (solver, hessian)
            ratio = (scores.norm(dim=1) / loo.norm(dim=1)).median()
            assert 0.8 < ratio < 1.25, (solver, hessian, ratio)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_large_damping_gives_grad_dot_direction(setup, solver):
    model, train, test = setup
    grad_dot = attribute(model, TASK, train, test, "grad_dot")["grad_dot"]
    kwargs = {"rank": 5} if solver == "arnoldi" else {}  # the complement is where H is treated as 0
    scores, _ = scores_of(solver, model, train, test, damping=1e6, **kwargs)
    assert (row_cosine(scores, grad_dot) > 0.999).all()
    assert (row_cosine(scores, grad_dot) < 1.0 + 1e-12).all()  # same sign: positive cosine, not -1


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_generalized_equals_standard_at_a_stationary_point_of_a_convex_problem(solver):
    x, y, x_test, y_test = least_squares()
    model, train, test = linear_model(fit_linear(x, y)), TensorDataset(x, y), TensorDataset(x_test, y_test)
    standard, _ = scores_of(solver, model, train, test, damping=0.1)
    general, settings = scores_of(solver, model, train, test, damping=0.1, generalized=True)
    assert settings["risk_gradient_norm"] < 1e-10
    torch.testing.assert_close(general, standard, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("hessian", ["gauss_newton", "exact"])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_generalized_differs_off_a_stationary_point_and_matches_its_dense_oracle(setup, solver, hessian):
    model, train, test = setup
    standard, _ = scores_of(solver, model, train, test, hessian=hessian, damping=0.5)
    general, settings = scores_of(solver, model, train, test, hessian=hessian, damping=0.5, generalized=True)
    oracle = dense_scores(model, train, test, hessian, 0.5, generalized=True)
    assert settings["newton_step_norm"] > 1e-3
    assert (general - standard).abs().max() > 1e-2 * standard.abs().max()
    assert (row_cosine(general, oracle) > 0.99).all()
    if solver != "lissa":
        torch.testing.assert_close(general, oracle, rtol=1e-6, atol=1e-9)


def test_lissa_too_small_scale_diverges_and_auto_scale_converges(setup):
    model, train, test = setup
    with pytest.raises(SolverDivergenceError, match="diverged"):
        scores_of("lissa", model, train, test, damping=0.5, scale=1.0)
    scores, settings = scores_of("lissa", model, train, test, damping=0.5, scale="auto")
    assert settings["lissa_scale"] > 1.0 and settings["lissa_scales_tried"][-1] == settings["lissa_scale"]
    assert settings["lissa_scale"] > settings["lissa_lambda_max"]  # above the largest eigenvalue: no divergence
    assert (row_cosine(scores, dense_scores(model, train, test, "gauss_newton", 0.5)) > 0.99).all()


def test_lissa_on_sampled_mini_batches_approximates_the_full_data_solve(setup):
    model, train, test = setup
    oracle = dense_scores(model, train, test, "gauss_newton", 2.0)
    scores, settings = scores_of("lissa", model, train, test, damping=2.0, batch_size=10, depth=150, repeat=4)
    assert (row_cosine(scores, oracle) > 0.95).all()
    again, _ = scores_of("lissa", model, train, test, damping=2.0, batch_size=10, depth=150, repeat=4)
    torch.testing.assert_close(scores, again, rtol=0, atol=0)  # seeded


def test_lissa_auto_scale_handles_noise_dominated_mini_batches(setup):
    """Tiny mini-batches (3 of 30): at scale 10 (below the largest eigenvalue, 20) the recursion stays
    bounded but oscillates; the noise floor is above tol, so both runs warn with the residual. ``auto``
    takes a scale above the largest eigenvalue and, averaging iterates, still solves."""
    model, train, test = setup
    oracle = dense_scores(model, train, test, "gauss_newton", 0.2)
    lissa = {"damping": 0.2, "batch_size": 3, "depth": 300}
    with pytest.warns(RuntimeWarning, match="reached depth=300 before the relative residual tol"):
        _, settings = scores_of("lissa", model, train, test, scale=10.0, **lissa)
    assert settings["solver"]["max_relative_residual"] > 1e-2 and not settings["solver"]["converged"]
    with pytest.warns(RuntimeWarning, match="reached depth=300 before the relative residual tol"):
        scores, settings = scores_of("lissa", model, train, test, scale="auto", **lissa)  # noise floor > tol
    assert settings["lissa_scale"] > 10.0 and settings["lissa_scale"] > settings["lissa_lambda_max"]
    assert settings["solver"]["max_relative_residual"] <= 1.0
    assert (row_cosine(scores, oracle) > 0.95).all()


def test_arnoldi_finds_the_top_eigenvalues(setup):
    model, train, test = setup
    dense = dense_curvature(model, train, "gauss_newton")
    top = torch.linalg.eigvalsh(dense).flip(0)[:4]
    est = build_estimator("arnoldi", rank=4, iterations=26, damping=0.5).fit(model, TASK, train)
    assert est.info["arnoldi"]["rank"] == 4
    torch.testing.assert_close(est.solver.eigenvalues.sort(descending=True).values, top)


def test_cg_reports_non_convergence_with_a_warning(setup):
    model, train, test = setup
    est = build_estimator("cg", damping=0.01, max_iter=2).fit(model, TASK, train)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        est.score(test)
    assert est.info["solver"]["converged"] is False and est.info["solver"]["iterations"] == 2
    est = build_estimator("cg", damping=0.5).fit(model, TASK, train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.score(test)
    assert est.info["solver"]["converged"] is True


def test_bad_settings_raise_clear_errors(setup):
    model, train, test = setup
    with pytest.raises(ValueError, match="max_params"):
        build_estimator("explicit", max_params=10).fit(model, TASK, train)
    with pytest.raises(ValueError, match="hessian must be one of"):
        build_estimator("cg", hessian="fisher").fit(model, TASK, train)
    with pytest.raises(ValueError, match="damping must be"):
        build_estimator("cg", damping=-1.0).fit(model, TASK, train)
    with pytest.raises(ValueError, match="needs damping > 0"):
        build_estimator("arnoldi", damping=0.0).fit(model, TASK, train)
    with pytest.raises(ValueError, match="scale must be"):
        build_estimator("lissa", scale=-2.0).fit(model, TASK, train)
    with pytest.raises(TypeError, match="unexpected argument"):
        build_estimator("cg", depth=3)
