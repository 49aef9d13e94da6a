"""Estimators on streamed training gradients: memory within the budget, scores as unchunked, projection.

The budget test runs Grad-Dot, DataInf and CG through ``attribute(..., memory_budget=B)`` on a model
whose full ``[N, P]`` training-gradient matrix is 4x ``B``; the scores must equal the same estimators
with a budget large enough to hold every gradient set, and the measured peak (process RSS above the
start) must stay under ``B`` + model + ``ACTIVATIONS``.
"""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from lightning_fimoda import SupervisedTask, attribute, build_estimator
from lightning_fimoda.exceptions import ConfigurationError
from lightning_fimoda.gradients import GradientCache
from lightning_fimoda.profiling import PeakMemory

from .conftest import make_regression

BUDGET = 8 << 20
# Beyond the budget's gradients (of which one chunk is computed at a time): the forward/backward
# activations of the curvature batch and of vmap, the loaded training batch, CG's and DataInf's [T, P]
# vectors, the score matrices and allocator slack. Measured here: ~10 MiB peak in all for B = 8 MiB.
ACTIVATIONS = 6 << 20
TINY = 8000  # bytes: one gradient row (x4 for vmap) of the small MLP fits half, its 10 training rows do not
ESTIMATORS = ["grad_dot", "datainf", {"name": "cg", "tol": 1e-10}]


def _mlp(d_in: int, hidden: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, 1)).double()


def _problem():
    model = _mlp(32, 128)
    p = sum(q.numel() for q in model.parameters())
    n = 4 * BUDGET // (p * 8)  # [N, P] float64 = 4x the budget
    return model, make_regression(n, d_in=32, seed=1), make_regression(2, d_in=32, seed=2)


def _measured_run(_: int = 0) -> tuple[int, dict, dict]:
    """Peak RSS of the budgeted run, the cache's storage decisions and the scores (in a fresh process)."""
    torch.set_num_threads(1)
    model, train, test = _problem()
    task = SupervisedTask("mse")
    attribute(model, task, Subset(train, range(48)), test, ESTIMATORS, memory_budget=BUDGET)  # warm-up: recomputed too
    cache = GradientCache(BUDGET)
    with PeakMemory("cpu") as meter:
        got = attribute(model, task, train, test, ESTIMATORS, cache=cache, progress=False)
    storage = {name: info["storage"] for name, info in cache.info["gradient_sets"].items()}
    return meter.peak_bytes, storage, dict(got)


def test_grad_dot_datainf_cg_within_budget_equal_unchunked():
    """The peak is measured in a fresh (spawned) process: the heap that earlier tests leave behind in the
    test process (freed but still resident, fragmented arenas) must not count against the budget."""
    model, train, test = _problem()
    task = SupervisedTask("mse")
    model_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    assert len(train) * model_bytes >= 4 * BUDGET - model_bytes
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        peak, storage, got = pool.map(_measured_run, [0])[0]
    assert storage["training loss"] == "recomputed" and storage["test measurement"] == "resident"
    assert peak < BUDGET + model_bytes + ACTIVATIONS, peak / 2**20
    big = GradientCache(1 << 30)
    want = attribute(model, task, train, test, ESTIMATORS, cache=big)
    assert big.info["gradient_sets"]["training loss"]["storage"] == "resident"
    for name in ("grad_dot", "datainf"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(got["cg"], want["cg"], rtol=1e-6, atol=1e-9 * want["cg"].abs().max().item())


@pytest.mark.parametrize("name", ["grad_dot", "datainf", "cg", "lissa", "arnoldi"])
def test_info_records_storage_and_parameter_count(name):
    model, task = _mlp(4, 8), SupervisedTask("mse")
    train, test = make_regression(10), make_regression(3, seed=2)
    small = GradientCache(TINY)
    for cache, storage in ((GradientCache(1 << 26), "resident"), (small, "recomputed")):
        est = build_estimator(name, params=["2.*", "4.*"]).fit(model, task, train, cache=cache)
        est.score(test)
        assert est.info["num_params"] == 8 * 8 + 8 + 8 + 1
        assert est.info["train_gradients"] == storage
        assert est.score(test).is_contiguous()  # reports save them with safetensors


def test_generalized_influence_streams_the_shifted_gradients():
    model, task = _mlp(4, 8), SupervisedTask("mse")
    train, test = make_regression(10), make_regression(3, seed=2)
    kwargs = dict(generalized=True, damping=0.1, tol=1e-10)
    want = build_estimator("cg", **kwargs).fit(model, task, train).score(test)
    est = build_estimator("cg", **kwargs).fit(model, task, train, cache=GradientCache(TINY))
    assert est.info["train_gradients"] == "recomputed"
    torch.testing.assert_close(est.score(test), want, rtol=1e-6, atol=1e-9 * want.abs().max().item())


def _projected(name: str, dim: int | None, model, train, test) -> torch.Tensor:
    return attribute(model, SupervisedTask("mse"), train, test, {"name": name, "projection_dim": dim})[name]


@pytest.mark.parametrize("name", ["grad_dot", "grad_cos"])
def test_projected_scores_approach_the_exact_ones(name):
    model = _mlp(16, 64)  # P = 5377 > 4096
    train, test = make_regression(30, d_in=16), make_regression(4, d_in=16, seed=2)
    exact = attribute(model, SupervisedTask("mse"), train, test, name)[name]
    assert torch.equal(_projected(name, None, model, train, test), exact)
    est = build_estimator("grad_dot").fit(model, SupervisedTask("mse"), train)
    g_test = est.test_matrix(test, torch.arange(4))
    scale = g_test.norm(dim=1)[:, None] * est.train_stream().collect().norm(dim=1)[None, :]
    if name == "grad_cos":
        scale = torch.ones_like(scale)
    errors = {d: ((_projected(name, d, model, train, test) - exact) / scale).abs() for d in (64, 4096)}
    # JL: the error of (Πg)·(Πh) has standard deviation <= sqrt(2/d) ‖g‖‖h‖ (0.022 at d = 4096)
    assert errors[4096].max() < 0.1, errors[4096].max()
    assert errors[4096].mean() < 0.5 * errors[64].mean()


def test_projection_settings_are_validated_and_datainf_refuses_them():
    with pytest.raises(ConfigurationError, match="per layer"):
        build_estimator("datainf", projection_dim=64)
    with pytest.raises(ConfigurationError, match="projection"):
        build_estimator("grad_dot", projection_dim=64, projection="sparse")
    with pytest.raises(ConfigurationError, match="projection_dim"):
        build_estimator("grad_cos", projection_dim=0)


def test_projected_grad_dot_uses_one_projector_for_train_and_test():
    model, task = _mlp(4, 8), SupervisedTask("mse")
    train = make_regression(6)
    est = build_estimator("grad_dot", projection_dim=8, projection="gaussian", projection_seed=3)
    scores = est.fit(model, task, train).score(train)
    g = est.train_stream().collect()
    assert g.shape == (6, 8)
    torch.testing.assert_close(scores, g @ g.T, rtol=1e-12, atol=0)
    assert est.info["num_params"] == sum(q.numel() for q in model.parameters())


def test_datainf_scoring_a_subset_streams_the_whole_training_set():
    model, task = _mlp(4, 8), SupervisedTask("mse")
    train, test = make_regression(10), make_regression(3, seed=2)
    a = build_estimator("datainf").fit(model, task, train, [1, 4], cache=GradientCache(TINY))
    assert a.info["train_gradients"] == "resident"
    b = build_estimator("datainf").fit(model, task, train).score(test)[:, [1, 4]]
    torch.testing.assert_close(a.score(test), b, rtol=1e-9, atol=1e-12)


def test_fewer_scored_than_test_examples_solve_the_test_side_when_training_gradients_do_not_fit():
    model, task = _mlp(4, 8), SupervisedTask("mse")
    train, test = make_regression(10), make_regression(8, seed=2)
    idx = torch.tensor([0, 5, 2, 7, 9])  # [5, P] does not fit TINY's resident half, one chunk does
    want = build_estimator("cg", damping=0.1, tol=1e-10).fit(model, task, train, idx)
    est = build_estimator("cg", damping=0.1, tol=1e-10).fit(model, task, train, idx, cache=GradientCache(TINY))
    assert want.info["train_gradients"] == "resident" and est.info["train_gradients"] == "recomputed"
    expected = want.score(test)
    assert want.info["solved_for"] == "train"
    torch.testing.assert_close(est.score(test), expected, rtol=1e-6, atol=1e-9 * expected.abs().max().item())
    assert est.info["solved_for"] == "test"
