"""Grad-Dot, DataInf and CG-style products on a model whose ``[N, P]`` gradients are 4x the memory budget.

The streamed computation is measured with :class:`PeakMemory` (process RSS) and must stay under
budget + model + a stated allowance (activations, allocator slack); its numbers must equal the unchunked formulas on the full gradient matrix, which is
computed afterwards, outside the measurement.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fimoda import SupervisedTask, per_sample_gradients
from lightning_fimoda.gradients import (
    GradientCache,
    streamed_fisher_products,
    streamed_layer_accumulate,
    streamed_layer_mean_square,
    streamed_products,
    streamed_transposed_products,
)
from lightning_fimoda.profiling import PeakMemory

BUDGET = 32 << 20
# Stated allowance above budget + model: the forward activations of one chunk and the allocator's slack (RSS
# keeps freed heap pages). Measured peaks here: 28.5 MiB and 40.9 MiB for B = 32 MiB (the full [N, P]
# matrix is 128 MiB).
ALLOWANCE = 16 << 20
N_TEST, CG_STEPS, DAMPING = 2, 5, 1e-3


def _cg(matvec, rhs: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` conjugate-gradient iterations for every row of ``rhs`` ``[k, P]`` at once, from 0 (in place)."""
    x, r = torch.zeros_like(rhs), rhs.clone()
    p, rs = r.clone(), (r * r).sum(dim=1, keepdim=True)
    for _ in range(steps):
        ap = matvec(p)
        alpha = rs / (p * ap).sum(dim=1, keepdim=True)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1.0)
        del ap
        rs_new = (r * r).sum(dim=1, keepdim=True)
        p.mul_(rs_new / rs).add_(r)
        rs = rs_new
    return x


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1)).double()
    p = sum(q.numel() for q in model.parameters())
    n = 4 * BUDGET // (p * 8)  # [N, P] float64 = 4x the budget
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n + N_TEST, 32, generator=g, dtype=torch.float64)
    data = TensorDataset(x, x[:, :3].sum(dim=1) + 0.1 * torch.randn(n + N_TEST, generator=g, dtype=torch.float64))
    return model, data, torch.arange(n), torch.arange(n, n + N_TEST)


def _estimators(cache, model, task, data, train, test):
    """Grad-Dot scores, DataInf scores, CG solutions and scores, mean gradient, all streamed."""
    g_test = cache.get(model, task, data, test, kind="measurement", what="test").flat  # resident [T, P]
    stream = cache.stream(model, task, data, train)
    n = stream.n
    out = {"grad_dot": streamed_products(stream, g_test.T).T}
    lam = {k: 0.1 * v for k, v in streamed_layer_mean_square(stream).items()}
    correction = streamed_layer_accumulate(stream, g_test, lam)
    keys = torch.empty_like(g_test)
    for name, sl in stream.layer_slices().items():
        keys[:, sl] = (g_test[:, sl] - correction[:, sl] / n) / lam[name]
    out["datainf"] = streamed_products(stream, keys.T).T
    del correction, keys  # operands live only as long as the estimator needs them
    out["mean_gradient"] = streamed_transposed_products(stream, torch.full((n, 1), 1.0 / n, dtype=g_test.dtype))
    solved = _cg(lambda v: streamed_fisher_products(stream, v).div_(n).add_(v, alpha=DAMPING), g_test, CG_STEPS)
    out["cg"] = streamed_products(stream, solved.T).T
    out["storage"] = stream.storage
    return out


def _dense(model, task, data, train, test):
    g = per_sample_gradients(model, task, data, train).flat
    gx = per_sample_gradients(model, task, data, test, kind="measurement").flat
    n = g.shape[0]
    keys = torch.empty_like(g)  # DataInf's training-side keys (SPEC §3), unchunked
    for sl in GradientCache(1 << 34).stream(model, task, data, train[:1]).layer_slices().values():
        gl = g[:, sl]
        lam = 0.1 * gl.pow(2).mean()
        w = 1.0 / (lam + gl.pow(2).sum(dim=1))
        keys[:, sl] = (gl - ((gl @ gl.T) * w[None, :]) @ gl / n) / lam
    solved = _cg(lambda v: v @ g.T @ g / n + DAMPING * v, gx, CG_STEPS)
    return {"grad_dot": gx @ g.T, "datainf": gx @ keys.T, "mean_gradient": g.mean(dim=0)[:, None], "cg": solved @ g.T}


def test_streamed_estimators_stay_within_budget_and_match_unchunked():
    model, data, train, test = _problem()
    task = SupervisedTask("mse")
    model_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    _estimators(GradientCache(BUDGET), model, task, data, train[:16], test)  # warm-up: allocator, kernels
    cache = GradientCache(BUDGET)
    with PeakMemory("cpu") as meter:
        got = _estimators(cache, model, task, data, train, test)
    full_bytes = train.numel() * model_bytes
    assert full_bytes >= 4 * BUDGET - model_bytes
    assert got["storage"] == "recomputed" and cache.info["gradient_sets"]["test measurement"]["storage"] == "resident"
    assert meter.peak_bytes < BUDGET + model_bytes + ALLOWANCE, (meter.peak_bytes / 2**20, BUDGET / 2**20)
    assert meter.peak_bytes < full_bytes / 2  # nowhere near the full gradient matrix
    want = _dense(model, task, data, train, test)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-12, msg=name)
