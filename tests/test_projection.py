"""Random projections: unbiased inner products, block-wise generation, scores converging with the dimension."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fimoda import SupervisedTask, per_sample_gradients
from lightning_fimoda.exceptions import ConfigurationError
from lightning_fimoda.gradients import GradientCache, streamed_products
from lightning_fimoda.projection import Projector


def _pair(p: int = 300):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(p, generator=g, dtype=torch.float64)
    b = 0.6 * a + torch.randn(p, generator=g, dtype=torch.float64)
    return a, b


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_inner_products_preserved_in_expectation(kind):
    a, b = _pair()
    dim, seeds = 32, 400
    est = torch.stack([
        (lambda x: x[0] @ x[1])(Projector(dim, kind, seed=s, block_size=64).project(torch.stack([a, b])))
        for s in range(seeds)
    ])
    exact = (a @ b).item()
    # variance of one estimate (Johnson-Lindenstrauss): (|a|²|b|² + (a·b)² - [2 Σ a_p² b_p² if ±1]) / d
    var = (a @ a) * (b @ b) + exact**2 - (2 * (a**2 @ b**2) if kind == "rademacher" else 0)
    std_of_mean = math.sqrt(var.item() / dim / seeds)
    assert abs(est.mean().item() - exact) < 4 * std_of_mean
    assert est.std().item() == pytest.approx(math.sqrt(var.item() / dim), rel=0.15)  # the variance is right too


def test_blockwise_generation_equals_one_explicit_matrix(monkeypatch):
    proj = Projector(16, "gaussian", seed=3, block_size=50)
    x = torch.randn(9, 173, dtype=torch.float64)
    r = torch.cat([proj.block(b, min(50, 173 - 50 * b), torch.float64, torch.device("cpu")) for b in range(4)])
    torch.testing.assert_close(proj.project(x), x @ r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(proj.project(x[:4]), proj.project(x)[:4], rtol=0, atol=0)  # any chunking
    rows = []
    original = Projector.block
    monkeypatch.setattr(Projector, "block", lambda self, b, n, *a: rows.append(n) or original(self, b, n, *a))
    proj.project(x)
    assert max(rows) == 50  # the [P, dim] matrix is never generated whole
    rad = Projector(16, seed=3, block_size=50).block(0, 50, torch.float64, torch.device("cpu"))
    assert set((rad * 4).unique().tolist()) == {-1.0, 1.0}  # ±1/√16
    assert not torch.equal(Projector(16, seed=4).project(x), Projector(16, seed=3).project(x))


def test_bad_projector_settings():
    for kwargs in ({"dim": 0}, {"dim": 4, "kind": "sparse"}, {"dim": 4, "block_size": 0}, {"dim": 4, "seed": -1}):
        with pytest.raises(ConfigurationError):
            Projector(**kwargs)
    with pytest.raises(ConfigurationError, match="Projector"):
        GradientCache().stream(nn.Linear(2, 1), SupervisedTask("mse"), TensorDataset(torch.randn(3, 2), torch.randn(3)),
                               torch.arange(3), projection=8)


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 1)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 10, generator=g, dtype=torch.float64)
    return model, TensorDataset(x, x[:, 0] - x[:, 1] ** 2)


def test_projected_grad_dot_converges_to_unprojected():
    model, data = _model_and_data()
    task = SupervisedTask("mse")
    train, test = torch.arange(30), torch.arange(30, 40)
    exact = (per_sample_gradients(model, task, data, test, kind="measurement").flat
             @ per_sample_gradients(model, task, data, train).flat.T)
    errors = []
    for dim in (64, 256, 1024, 4096):
        cache, proj = GradientCache(memory_budget=1 << 26), Projector(dim, seed=11)
        g_test = cache.stream(model, task, data, test, kind="measurement", projection=proj).collect()
        stream = cache.stream(model, task, data, train, projection=proj)
        assert stream.num_params == dim and stream.storage == "resident"
        errors.append(((streamed_products(stream, g_test.T).T - exact).norm() / exact.norm()).item())
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 4 and errors[-1] < 0.1, errors  # ~1/√dim: 8x from 64 to 4096


def test_recomputed_projected_stream_equals_resident():
    model, data = _model_and_data()
    task, proj = SupervisedTask("mse"), Projector(1024, "gaussian", seed=2, block_size=500)
    idx = torch.arange(40)
    resident = GradientCache(memory_budget=1 << 26).stream(model, task, data, idx, projection=proj)
    small = GradientCache(memory_budget=2 * 4 * 2121 * 8 * 4)  # 4-row chunks; [40, 1024] exceeds the other half
    recomputed = small.stream(model, task, data, idx, projection=proj)
    assert (resident.storage, recomputed.storage) == ("resident", "recomputed")
    assert small.info["gradient_sets"]["training loss (projected)"]["storage"] == "recomputed"
    eye = torch.eye(1024, dtype=torch.float64)
    torch.testing.assert_close(streamed_products(recomputed, eye), resident.collect(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(recomputed.collect(), resident.collect(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigurationError, match="no per-layer"):
        resident.layer_slices()
