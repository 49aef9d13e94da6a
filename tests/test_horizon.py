"""Horizon-matched influence against dense eigendecompositions, Grad-Dot, the influence function, exact
leave-one-out further training (naive loops and the library's gold standard) and linear recursions."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch.utils.data import TensorDataset

from lightning_fimoda import FiMODACallback, FurtherTrainingLoop, SupervisedTask, attribute, build_estimator
from lightning_fimoda.estimators.horizon import HorizonConfig
from lightning_fimoda.exceptions import ConfigurationError
from lightning_fimoda.solvers.matrix_function import horizon_filter

from .conftest import make_mlp, make_regression
from .helpers import dense_gauss_newton, fit_to_convergence, flat_model, mse, row_cosine

TASK = SupervisedTask("mse")
CHUNK = 15  # tiny float64 products over > 16 examples hit a slow BLAS path on this CPU build


def two_identity(o: Tensor, y: Tensor) -> Tensor:
    return 2 * torch.eye(o.shape[1], dtype=o.dtype).expand(len(o), o.shape[1], o.shape[1])


def grads(model: nn.Module, data: TensorDataset) -> Tensor:
    """Per-example loss gradients ``[n, P]`` by ``jacrev`` (independent of the package)."""
    theta0, call = flat_model(model)
    x, y = data.tensors
    return jacrev(lambda th: mse(call(th, x), y))(theta0)


def oracle(model, train, test, steps, lr) -> Tensor:
    """``(1/n) g_x φ_t(H) g_jᵀ`` ``[C, T, N]`` from a dense Gauss-Newton eigendecomposition,
    ``φ_t(λ) = (1 − (1 − ηλ)^t)/λ`` written as ``−expm1(t log1p(−ηλ))/λ`` (``ηt`` at ``λ = 0``)."""
    evals, evecs = torch.linalg.eigh(dense_gauss_newton(model, train, two_identity))
    g_test, g_train = grads(model, test) @ evecs, grads(model, train) @ evecs
    out = []
    for t in steps:
        tiny = evals.abs() < 1e-12
        phi = torch.where(tiny, lr * t, -torch.expm1(t * torch.log1p(-lr * evals)) / torch.where(tiny, 1.0, evals))
        out.append(g_test * phi @ g_train.T / len(train))
    return torch.stack(out)


def horizon(model, train, test, **settings) -> Tensor:
    est = build_estimator("horizon", chunk_size=CHUNK, **settings)
    return est.fit(model, TASK, train).score(test), est


@pytest.fixture(scope="module")
def problem():
    model = make_mlp(d_in=3, hidden=5)  # P = 26 > n = 12: a singular Gauss-Newton matrix
    return model, make_regression(12, d_in=3, seed=1), make_regression(4, d_in=3, seed=2)


@pytest.mark.parametrize("exact", ["dense", "low_rank", False])
def test_equals_dense_eigendecomposition(problem, exact):
    model, train, test = problem
    scores, est = horizon(model, train, test, lr=0.05, steps=40, eval_every=7, batch_size=4, exact=exact,
                          krylov_steps=26, krylov_tol=0.0)
    assert est.info["checkpoint_steps"] == [7, 14, 21, 28, 35, 40]
    want = oracle(model, train, test, [7, 14, 21, 28, 35, 40], 0.05)
    assert est.info["path"] == (exact or "krylov")
    assert (scores - want).abs().max() <= 1e-8 * want.abs().max()
    if not exact:
        assert est.info["krylov_error"] < 1e-6


def test_first_step_is_grad_dot(problem):
    model, train, test = problem
    scores, _ = horizon(model, train, test, lr=0.05, steps=3, eval_every=1, batch_size=4)
    dot = build_estimator("grad_dot").fit(model, TASK, train).score(test)
    torch.testing.assert_close(scores[0], dot * 0.05 / len(train), rtol=1e-10, atol=1e-14)


def test_long_horizon_is_the_influence_function():
    """Least squares: positive-definite ``H``; ``φ_t(H) → H^{-1}`` geometrically in ``t``."""
    model = nn.Linear(3, 1).double()
    train, test = make_regression(12, d_in=3, seed=1), make_regression(4, d_in=3, seed=2)
    inf = build_estimator("explicit", damping=0.0, chunk_size=CHUNK).fit(model, TASK, train).score(test)
    scores, est = horizon(model, train, test, lr=0.5 / 3, epochs=400, batch_size=12)
    eta_lam_min = 0.5 / 3 * torch.linalg.eigvalsh(dense_gauss_newton(model, train, two_identity)).min()
    errors = [float((s - inf).norm() / inf.norm()) for s in scores]
    assert errors[0] > 0.1 and errors[-1] < 1e-8
    for t in (10, 50, 100):  # the remainder is (I − ηH)^t H^{-1}: bounded by (1 − ηλ_min)^t · cond
        assert errors[t - 1] <= 5 * float(1 - eta_lam_min) ** t
    assert est.info["eta_lambda_max"] < 2


def naive_loo_differences(model, train, test, lr, steps, momentum=0.0) -> Tensor:
    """``f(x; θ^{−j}_t) − f(x; θ_t)`` ``[steps, T, N]`` of full-batch heavy-ball GD with ``subtract``:
    one explicit run per ``j`` (PyTorch's momentum form), the obvious way."""
    theta0, call = flat_model(model)
    n = len(train)
    x, y = train.tensors

    def run(drop: int | None) -> Tensor:
        theta, buf, out = theta0.clone(), torch.zeros_like(theta0), []
        for _ in range(steps):
            th = theta.requires_grad_(True)
            losses = mse(call(th, x), y)
            risk = losses.mean() - (losses[drop] / n if drop is not None else 0.0)
            g = torch.autograd.grad(risk, th)[0]
            buf = momentum * buf + g
            theta = (th - lr * buf).detach()
            out.append(mse(call(theta, test.tensors[0]), test.tensors[1]).detach())
        return torch.stack(out)  # [steps, T]

    full = run(None)
    return torch.stack([run(j) - full for j in range(n)], dim=2)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_matches_loo_further_training_to_first_order(momentum):
    """Least squares at its minimiser, full-batch GD: the exact LOO differences, by naive loops and by
    the library's gold standard (which also checks the checkpoint schedule). The relative error is
    first order in ``η`` (quadratic ``f``, gradients moving with ``θ^{−j}``): 10x smaller ``η``, ~10x smaller."""
    model = fit_to_convergence(nn.Linear(3, 1).double(), TASK, make_regression(12, d_in=3, seed=1))
    train, test = make_regression(12, d_in=3, seed=1), make_regression(4, d_in=3, seed=2)
    errors = []
    for lr in (1e-2, 1e-3):
        scores, _ = horizon(model, train, test, lr=lr, epochs=30, batch_size=12, momentum=momentum)
        naive = naive_loo_differences(model, train, test, lr, 30, momentum)
        errors.append(float((scores[-1] - naive[-1]).norm() / naive[-1].norm()))
    assert errors[1] < 0.05 and errors[1] < 0.15 * errors[0], errors
    for t in (0, 9, 29):
        assert row_cosine(scores[t], naive[t]).min() > 0.999
    loop = FurtherTrainingLoop(TASK, lr=1e-3, epochs=30, batch_size=12, seeds=1, momentum=momentum,
                               adjustments=("full",), progress=False, engine="sequential")
    gold = loop.run(model, train, test, loo_indices=list(range(12))).scores("full")
    torch.testing.assert_close(gold, naive, rtol=1e-6, atol=1e-12)


def test_momentum_filter_equals_a_linear_recursion(problem):
    """``d_{k+1} = d_k − η(H d_k − g_j/n) + β(d_k − d_{k−1})`` iterated with the dense matrix."""
    model, train, test = problem
    lr, beta, n = 0.05, 0.7, len(train)
    h = dense_gauss_newton(model, train, two_identity)
    g_train, g_test = grads(model, train), grads(model, test)
    prev, d, want = torch.zeros_like(g_train.T), torch.zeros_like(g_train.T), []
    for _ in range(20):
        prev, d = d, d - lr * (h @ d - g_train.T / n) + beta * (d - prev)
        want.append(g_test @ d)
    for exact in ("dense", "low_rank", False):
        scores, _ = horizon(model, train, test, lr=lr, steps=20, eval_every=1, batch_size=4, momentum=beta,
                            exact=exact, krylov_steps=26, krylov_tol=0.0)
        assert (scores - torch.stack(want)).abs().max() <= 1e-8 * scores.abs().max()
    lam = torch.tensor([0.0, 1.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(horizon_filter(lam, [1, 2], lr, beta)[1], lr * (2 + beta - lr * lam))


def test_krylov_matches_exact_on_the_benchmark_mlp():
    """8-128-128-1 (P = 17,793) float32: Krylov vs an exact low-rank eigendecomposition of the Gauss-Newton
    matrix ``H = (2/n) Jᵀ J`` (from the Gram matrix ``J Jᵀ`` of the output Jacobian ``J`` ``[n, P]``, float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
    train, test = (make_regression(n, d_in=8, seed=s, dtype=torch.float32) for n, s in ((128, 1), (4, 2)))
    lr, steps = 0.01, [2 * e for e in range(1, 41)]  # 40 epochs of batch 64 over n = 128: t up to 80 > k
    est = build_estimator("horizon", lr=lr, epochs=40, batch_size=64, krylov_steps=40, exact=False)
    scores = est.fit(model, TASK, train).score(test)
    auto = build_estimator("horizon", lr=lr, epochs=40, batch_size=64)  # R = 128 factor rows: exact, low rank
    low_rank = auto.fit(model, TASK, train).score(test)
    assert auto.info["path"] == "low_rank"
    assert est.info["path"] == "krylov" and est.info["checkpoint_steps"] == steps
    m64 = model.double()
    params = {k: v.detach() for k, v in m64.named_parameters()}
    jac = jacrev(lambda p: functional_call(m64, p, (train.tensors[0].double(),)))(params)
    jac = torch.cat([j.reshape(len(train), -1) for j in jac.values()], dim=1)  # [n, P]
    gram_evals, u = torch.linalg.eigh(jac @ jac.T)  # J = U S Vᵀ: Vᵀ = S^{-1} Uᵀ J
    vh = (u / gram_evals.clamp_min(1e-30).sqrt()).T @ jac
    phi = horizon_filter(2 * gram_evals / len(train), steps, lr)  # [C, n] on the range of H
    g_test, g_train = (grads(m64, TensorDataset(*(t.double() for t in d.tensors))) for d in (test, train))
    base = lr * torch.tensor(steps, dtype=torch.float64).view(-1, 1, 1) * (g_test @ g_train.T)  # φ_t(0) = ηt
    low = torch.einsum("tr,cr,nr->ctn", g_test @ vh.T, phi - lr * torch.tensor(steps).view(-1, 1), g_train @ vh.T)
    want = (base + low) / len(train)
    for c in (0, 9, 19, 39):
        assert row_cosine(scores[c].double(), want[c]).min() > 0.999
        assert row_cosine(low_rank[c].double(), want[c]).min() > 0.99999
    assert est.info["krylov_error"] < 1e-6 and est.info["krylov_dimension"][1] < 40  # stopped early


def test_bad_settings_raise_clearly(problem):
    model, train, test = problem
    with pytest.raises(ConfigurationError, match="lr"):
        build_estimator("horizon", lr=0.0, epochs=1)
    with pytest.raises(ConfigurationError, match="epochs= or steps="):
        build_estimator("horizon", lr=0.1)
    with pytest.raises(ConfigurationError, match="hessian"):
        build_estimator("horizon", lr=0.1, epochs=1, hessian="fisher")
    adam = FurtherTrainingLoop(TASK, optimizer="adam", lr=1e-3, epochs=1, progress=False)
    with pytest.raises(ConfigurationError, match="SGD"):
        build_estimator("horizon", gold=adam)
    sgd = FurtherTrainingLoop(TASK, lr=1e-3, epochs=1, progress=False)
    with pytest.raises(ConfigurationError, match="not both"):
        build_estimator("horizon", gold=sgd, lr=0.1)
    with pytest.raises(ConfigurationError, match="low_rank"):  # the true Hessian has no Gauss-Newton factor
        build_estimator("horizon", lr=0.1, epochs=1, hessian="exact", exact="low_rank").fit(model, TASK, train)
    for exact in ("dense", "low_rank", False):
        est = build_estimator("horizon", lr=100.0, epochs=2, exact=exact, chunk_size=CHUNK)
        with pytest.raises(ConfigurationError, match="diverges"):
            est.fit(model, TASK, train)


def test_settings_copied_from_the_gold_standard_loop(problem):
    model, train, test = problem
    loop = FurtherTrainingLoop(TASK, lr=0.05, epochs=3, batch_size=5, momentum=0.5, seeds=1, progress=False)
    est = build_estimator("horizon", gold=loop, hessian=True, chunk_size=CHUNK)
    assert est.config == HorizonConfig(lr=0.05, epochs=3, batch_size=5, momentum=0.5, hessian="true",
                                       chunk_size=CHUNK)
    est.fit(model, TASK, train)
    assert est.info["checkpoint_steps"] == [3, 6, 9]  # ceil(12 / 5) = 3 steps per epoch
    assert est.score(test).shape == (3, 4, 12)
    assert est.settings()["hessian"] == "exact" and est.settings()["lr"] == 0.05


def test_attribute_returns_checkpoint_indexed_scores(problem):
    model, train, test = problem
    settings = dict(lr=0.05, epochs=2, batch_size=4, chunk_size=CHUNK)
    out = attribute(model, TASK, train, test, [build_estimator("horizon", **settings), "grad_dot"])
    direct = build_estimator("horizon", **settings).fit(model, TASK, train).score(test)
    assert out["horizon"].shape == (2, 4, 12) and out["grad_dot"].shape == (4, 12)
    torch.testing.assert_close(out["horizon"], direct, rtol=1e-12, atol=0.0)


def test_callback_copies_its_gold_settings():
    gold = {"lr": 0.05, "epochs": 3, "batch_size": 5, "momentum": 0.5, "seeds": 1}
    cb = FiMODACallback(estimators=[{"name": "horizon", "gold": True, "exact": False}, "grad_dot"], gold=gold,
                        progress=False)
    assert cb.estimators[0].config == HorizonConfig(lr=0.05, epochs=3, batch_size=5, momentum=0.5, exact=False)
    with pytest.raises(ConfigurationError, match="no gold standard"):
        FiMODACallback(estimators=[{"name": "horizon", "gold": True}])
    with pytest.raises(ConfigurationError, match="gold= must be a FurtherTrainingLoop"):
        build_estimator("horizon", gold=True)
