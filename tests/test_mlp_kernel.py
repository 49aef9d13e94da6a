"""The hand-written MLP kernel (further_training/mlp.py) against torch.func gradients of the same
weighted losses, with the members split over several cache-sized chunks; the stacked optimizer's fused
Adam path against torch.optim."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from lightning_fimoda import SupervisedTask
from lightning_fimoda.further_training.mlp import MLPKernel

from .helpers import assert_matches_torch_optim

K, R = 7, 5


@pytest.fixture(autouse=True)
def one_thread():
    """The kernel splits the members into chunks on one CPU thread only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def oracle(model, loss, params, x, y, w):
    """``vmap(grad)`` of ``Σ_r w[k, r] ℓ(x[k, r], y[k, r])`` through the module itself."""

    def weighted(p, xk, yk, wk):
        out = functional_call(model, p, (xk,))
        if loss == "mse":
            ell = (out - yk).pow(2).sum(-1)
        else:
            ell = nn.functional.cross_entropy(out, yk, reduction="none")
        return (ell * wk).sum()

    return vmap(grad_and_value(weighted))(params, x, y, w)


def stacked(model):
    """Per-member parameters: ``K`` slightly different copies of ``model``'s."""
    gen = torch.Generator().manual_seed(1)
    return {
        n: p.detach() + 0.1 * torch.randn(K, *p.shape, generator=gen, dtype=p.dtype)
        for n, p in model.named_parameters()
    }


MODELS = {
    "relu-mse": (
        lambda: nn.Sequential(nn.Linear(3, 9), nn.ReLU(), nn.Linear(9, 9), nn.ReLU(), nn.Linear(9, 1)),
        "mse",
    ),
    # activations on the inputs, two in a row (the first one's output must survive the second), a
    # narrow hidden layer, no bias, a wide output
    "mixed-ce": (
        lambda: nn.Sequential(
            nn.Tanh(),
            nn.Linear(3, 12),
            nn.Sigmoid(),
            nn.Tanh(),
            nn.Linear(12, 2),
            nn.LeakyReLU(0.2),
            nn.Sigmoid(),
            nn.Dropout(0.5),
            nn.Linear(2, 11, bias=False),
        ),
        "cross_entropy",
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    "cache_bytes", [1, 300, 1 << 20], ids=["one-member-chunks", "chunks-of-2", "one-chunk"]
)
def test_kernel_matches_torch_func(name, cache_bytes):
    build, loss = MODELS[name]
    torch.manual_seed(0)
    model = build().double().eval()
    params = stacked(model)
    x = torch.randn(K, R, 3, dtype=torch.float64)
    y = torch.randn(K, R, 1, dtype=torch.float64) if loss == "mse" else torch.randint(0, 11, (K, R))
    w = torch.rand(K, R, dtype=torch.float64) - 0.2  # negative weights too (subtract's z_j row)
    kernel = MLPKernel(model, SupervisedTask(loss), cache_bytes=cache_bytes)
    want_g, want_v = oracle(model, loss, params, x, y, w)
    for _ in range(2):  # the second call reuses the kernel's buffers
        got_g, got_v = kernel.grad_and_value(params, x, y, w)
        torch.testing.assert_close(got_v, want_v, rtol=1e-12, atol=1e-12)
        assert list(got_g) == list(params)
        for n in params:
            torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-10, atol=1e-12)
    assert max(float(g.abs().max()) for g in want_g.values()) > 1e-3


def test_kernel_chunks_follow_the_cache_budget_and_the_last_short_batch():
    """Several batch lengths in a row (the epoch's short last batch) and chunk sizes that do not divide K."""
    build, _ = MODELS["relu-mse"]
    torch.manual_seed(0)
    model = build().double()
    params = stacked(model)
    kernel = MLPKernel(model, SupervisedTask("mse"), cache_bytes=3 * R * 9 * 8)  # 3 members per chunk
    for rows in (R, 2, R):
        x = torch.randn(K, rows, 3, dtype=torch.float64)
        y = torch.randn(K, rows, 1, dtype=torch.float64)
        w = torch.full((K, rows), 1.0 / rows, dtype=torch.float64)
        got_g, got_v = kernel.grad_and_value(params, x, y, w)
        want_g, want_v = oracle(model, "mse", params, x, y, w)
        torch.testing.assert_close(got_v, want_v, rtol=1e-12, atol=1e-12)
        for n in params:
            torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("cache_bytes", [300, 1 << 20], ids=["chunks", "one-chunk"])
def test_kernel_measurement_matches_the_task(name, cache_bytes):
    """The engine's test measurements by the kernel's forward: the task's ``f`` (its per-example loss)
    of every member on one shared batch, against ``vmap`` of the task through the module."""
    from lightning_fimoda.functional import FunctionalTask

    build, loss = MODELS[name]
    torch.manual_seed(0)
    model = build().double().eval()
    params = stacked(model)
    x = torch.randn(R + 2, 3, dtype=torch.float32)  # float32 data, float64 model: cast like the task's call
    y = torch.randn(R + 2, 1, dtype=torch.float64) if loss == "mse" else torch.randint(0, 11, (R + 2,))
    task = SupervisedTask(loss)
    want = vmap(FunctionalTask(model, task).measurement, in_dims=(0, None))(params, (x.double(), y))
    got = MLPKernel(model, task, cache_bytes=cache_bytes).measurement(params, (x, y))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float(want.std()) > 1e-3


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_adam_with_non_contiguous_gradients_matches_torch_optim(name):
    """``vmap(grad)`` can return gradients in another memory layout than the parameters (a BERT model's
    did); the fused kernel walks memory in order, so the layouts must agree (this failed at 1e-2)."""
    from lightning_fimoda.further_training import FurtherTrainingConfig
    from lightning_fimoda.further_training.optimizers import StackedOptimizer

    torch.manual_seed(0)
    opt = StackedOptimizer(FurtherTrainingConfig(epochs=1, optimizer=name, lr=0.01, weight_decay=0.1))
    start = {"w": torch.randn(3, 4, 2, dtype=torch.float64), "b": torch.randn(3, 2, dtype=torch.float64)}
    grads = [
        {"w": torch.randn(3, 2, 4, dtype=torch.float64).mT, "b": torch.randn(2, 3, dtype=torch.float64).T}
        for _ in range(4)
    ]
    assert not grads[0]["w"].is_contiguous()
    assert_matches_torch_optim(opt, start, grads, sit_out=1)  # step 1: one model sits out; then counts differ


def _energy_step_case(dtype: torch.dtype, compiled: bool) -> None:
    """``benchmarks/further_training.energy_step`` (the compiled variants' step, SGD fused) against the
    kernel's gradients and losses and ``θ − lr·g``; 5 runs in chunks of 2 and 3."""
    from benchmarks.further_training import energy_step

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)).to(dtype)
    k, r, lr = 5, 7, 0.1
    params = {n: p.detach() + 0.1 * torch.randn(k, *p.shape, dtype=dtype) for n, p in model.named_parameters()}
    x, y, w = torch.randn(k, r, 8, dtype=dtype), torch.randn(k, r, 1, dtype=dtype), torch.rand(k, r, dtype=dtype)
    grads, value = MLPKernel(model, SupervisedTask("mse")).grad_and_value(params, x, y, w)
    step = energy_step(3, lr)
    if compiled:
        step = torch.compile(step, fullgraph=True, dynamic=False)
    stepped = [p.clone() for p in params.values()]
    *got, got_value = step(stepped, x, y, w)
    tol = 1e-6 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(got_value, value, rtol=tol, atol=tol * float(value.abs().max()))
    for (n, p), g, new in zip(params.items(), got, stepped):
        scale = float(grads[n].abs().max())
        torch.testing.assert_close(g, grads[n], rtol=tol, atol=tol * scale)
        torch.testing.assert_close(new, p - lr * grads[n], rtol=tol, atol=tol * scale)
        assert scale > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_benchmark_energy_step_matches_the_kernel(dtype):
    _energy_step_case(dtype, compiled=False)


@pytest.mark.slow
def test_benchmark_energy_step_compiled_matches_the_kernel():
    """The same step through ``torch.compile`` (inductor generates and builds C++), float32."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler (g++/c++) on PATH: inductor cannot build CPU kernels")
    _energy_step_case(torch.float32, compiled=True)
