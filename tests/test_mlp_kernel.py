"""The hand-written MLP kernel (further_training/mlp.py) against torch.func gradients of the same
weighted losses, on both its paths: ``torch.bmm`` with the members split over several cache-sized chunks,
and the compiled step (further_training/native.py, mlp_step.c); the stacked optimizer's fused Adam path
against torch.optim."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from lightning_fimoda import SupervisedTask
from lightning_fimoda.further_training import native
from lightning_fimoda.further_training.mlp import MLPKernel
from lightning_fimoda.further_training.native import CompiledStep

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
    # what the compiled step runs: every activation, a narrow layer, no bias, one after the output
    "native-ce": (
        lambda: nn.Sequential(
            *(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 9), nn.LeakyReLU(0.2), nn.Linear(9, 2), nn.Tanh()),
            *(nn.Dropout(0.5), nn.Linear(2, 11, bias=False), nn.Sigmoid()),
        ),
        "cross_entropy",
    ),
}
NATIVE = {
    "relu-mse": None,
    "mixed-ce": "the model has an activation before its first Linear layer",
    "native-ce": None,
}


def make_kernel(model, loss, cache_bytes, native_path):
    """The kernel on the path asked for, checked to be the one it takes."""
    kernel = MLPKernel(model, SupervisedTask(loss), cache_bytes=cache_bytes, native=native_path)
    assert kernel._uses_native(torch.zeros((), dtype=torch.float64)) == (
        native_path and kernel.native_unavailable is None
    )
    return kernel


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    ("cache_bytes", "native_path"),
    [(1, False), (300, False), (1 << 20, False), (1 << 20, True)],
    ids=["one-member-chunks", "chunks-of-2", "one-chunk", "native"],
)
def test_kernel_matches_torch_func(name, cache_bytes, native_path):
    build, loss = MODELS[name]
    torch.manual_seed(0)
    model = build().double().eval()
    params = stacked(model)
    x = torch.randn(K, R, 3, dtype=torch.float64)
    y = torch.randn(K, R, 1, dtype=torch.float64) if loss == "mse" else torch.randint(0, 11, (K, R))
    w = torch.rand(K, R, dtype=torch.float64) - 0.2  # negative weights too (subtract's z_j row)
    kernel = make_kernel(model, loss, cache_bytes, native_path)
    if native_path:
        assert kernel.native_unavailable == NATIVE[name]
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
    kernel = MLPKernel(model, SupervisedTask("mse"), cache_bytes=3 * R * 9 * 8, native=False)  # 3 per chunk
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
@pytest.mark.parametrize(
    ("cache_bytes", "native_path"),
    [(300, False), (1 << 20, False), (1 << 20, True)],
    ids=["chunks", "one-chunk", "native"],
)
def test_kernel_measurement_matches_the_task(name, cache_bytes, native_path):
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
    kernel = make_kernel(model, loss, cache_bytes, native_path)
    with mock.patch.object(CompiledStep, "__call__", autospec=True, side_effect=CompiledStep.__call__) as step:
        got = kernel.measurement(params, (x, y))
    assert step.called == kernel._uses_native(x.double())  # the path asked for is the one taken
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float(want.std()) > 1e-3


def test_native_float32_matches_the_bmm_path_on_the_energy_shape():
    """The benchmark's 8-128-128-1 ReLU net, 21 members of 129 rows (subtract's z_j row weighted < 0):
    the compiled step (BLAS products member by member) against the ``bmm`` path, to float32 rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
    params = {n: p.detach() + 0.01 * torch.randn(21, *p.shape) for n, p in model.named_parameters()}
    x, y = torch.randn(129, 8).expand(21, 129, 8), torch.randn(21, 129, 1)  # x shared: member stride 0
    w = torch.full((21, 129), 1 / 128)
    w[:, -1] = -1 / 691
    fast = MLPKernel(model, SupervisedTask("mse"))
    slow = MLPKernel(model, SupervisedTask("mse"), native=False)
    assert fast._uses_native(w) and not slow._uses_native(w)
    want_g, want_v = slow.grad_and_value(params, x, y, w)
    got_g, got_v = fast.grad_and_value(params, x, y, w)
    torch.testing.assert_close(got_v, want_v, rtol=1e-6, atol=0)
    for n in params:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-6, atol=1e-6 * float(want_g[n].abs().max()))
    torch.testing.assert_close(
        fast.measurement(params, (x[0], y[0])), slow.measurement(params, (x[0], y[0])), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("threads", [2, 3])
def test_native_splits_the_members_over_threads(threads):
    """With T torch threads the compiled step splits the members over T OpenMP threads (7 members: uneven
    shares), each on its own scratch: the same gradients as the oracle, call after call."""
    build, loss = MODELS["native-ce"]
    torch.manual_seed(0)
    model = build().double().eval()
    params = stacked(model)
    x = torch.randn(K, R, 3, dtype=torch.float64)
    y = torch.randint(0, 11, (K, R))
    w = torch.rand(K, R, dtype=torch.float64) - 0.2
    want_g, want_v = oracle(model, loss, params, x, y, w)
    torch.set_num_threads(threads)  # the fixture restores it
    if not native.load()[0].parallel:
        pytest.skip("built without OpenMP: the compiled step runs on one thread only")
    kernel = MLPKernel(model, SupervisedTask(loss))
    assert kernel._uses_native(w)
    for _ in range(3):
        got_g, got_v = kernel.grad_and_value(params, x, y, w)
        torch.testing.assert_close(got_v, want_v, rtol=1e-12, atol=1e-12)
        for n in params:
            torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-10, atol=1e-12)


def test_native_keeps_nan_like_torch():
    """A NaN weight must reach the loss (the engine's divergence check reads it), as through torch's
    ReLU; a ReLU that maps NaN to 0 would hide it behind a finite loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    params = stacked(model)
    params["0.weight"][2, 1, 0] = float("nan")
    x, y, w = (
        torch.randn(K, R, 3, dtype=torch.float64),
        torch.randn(K, R, 1, dtype=torch.float64),
        torch.ones(K, R, dtype=torch.float64),
    )
    _, want_v = oracle(model, "mse", params, x, y, w)
    grads, value = MLPKernel(model, SupervisedTask("mse")).grad_and_value(params, x, y, w)
    assert torch.equal(value.isnan(), want_v.isnan()) and bool(value[2].isnan())
    assert bool(grads["2.weight"][2].isnan().any())


@pytest.mark.parametrize("threads", [1, 2])
def test_native_rejects_a_label_out_of_range(threads):
    torch.set_num_threads(threads)  # on 2 threads, the error of one member's thread reaches the caller
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    params = stacked(model)
    x, w = torch.randn(K, R, 3, dtype=torch.float64), torch.ones(K, R, dtype=torch.float64)
    y = torch.zeros(K, R, dtype=torch.long)
    y[3, 1] = 2
    kernel = MLPKernel(model, SupervisedTask("cross_entropy"))
    with pytest.raises(ValueError, match=r"label is outside \[0, 2\)"):
        kernel.grad_and_value(params, x, y, w)


def test_native_says_why_it_cannot_run(monkeypatch):
    """Disabled, or no compiler: the reason is reported and the kernel keeps the ``bmm`` path (same numbers)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    params = stacked(model)
    x, y, w = (torch.randn(K, R, d, dtype=torch.float64) for d in (3, 1, 1))
    want_g, want_v = oracle(model, "mse", params, x, y, w[..., 0])
    for env, why in [
        ({"FIMODA_NATIVE": "0"}, "disabled by FIMODA_NATIVE=0"),
        ({"CC": "no-such-cc"}, "no C compiler"),
    ]:
        native._load.cache_clear()
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            kernel = MLPKernel(model, SupervisedTask("mse"))
            assert why in kernel.native_unavailable and not kernel._uses_native(w)
            got_g, got_v = kernel.grad_and_value(params, x, y, w[..., 0])
        torch.testing.assert_close(got_v, want_v, rtol=1e-12, atol=1e-12)
    native._load.cache_clear()
    assert MLPKernel(model, SupervisedTask("mse")).native_unavailable is None


def load_afresh(monkeypatch, patch) -> tuple:
    """``native.load()`` built anew with ``patch(monkeypatch)`` applied; the patch and cache undone after."""
    native._load.cache_clear()
    try:
        patch(monkeypatch)
        return native.load()
    finally:
        monkeypatch.undo()
        native._load.cache_clear()


def test_native_reports_a_failed_build(monkeypatch, tmp_path):
    """A compiler that fails: its complaint is in the reason."""
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    cc.chmod(0o755)
    lib, why = load_afresh(monkeypatch, lambda m: m.setenv("CC", str(cc)))
    assert lib is None and "could not build mlp_step.c: broken compiler" in why


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
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)).to(
        dtype
    )
    k, r, lr = 5, 7, 0.1
    params = {
        n: p.detach() + 0.1 * torch.randn(k, *p.shape, dtype=dtype) for n, p in model.named_parameters()
    }
    x, y, w = (
        torch.randn(k, r, 8, dtype=dtype),
        torch.randn(k, r, 1, dtype=dtype),
        torch.rand(k, r, dtype=dtype),
    )
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


def test_native_reports_a_build_that_cannot_be_loaded(monkeypatch):
    """The built library refused by the loader (e.g. a noexec temporary directory): a reason, no crash."""
    real = native.ctypes.CDLL

    def cdll(path, *args, **kwargs):
        if str(path).endswith("mlp_step.so"):
            raise OSError("failed to map segment from shared object")
        return real(path, *args, **kwargs)

    lib, why = load_afresh(monkeypatch, lambda m: m.setattr(native.ctypes, "CDLL", cdll))
    assert lib is None and "could not be loaded (failed to map segment" in why


def test_native_says_why_a_deep_model_takes_the_bmm_path():
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(65)))
    assert MLPKernel(model, SupervisedTask("mse")).native_unavailable == "the model has more than 64 Linear layers"


def test_native_refuses_parameters_of_another_dtype():
    """float64 parameters with float32 rows: an error, never float64 memory read as float32."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    params = stacked(model)
    x, y, w = (torch.randn(K, R, d) for d in (3, 1, 1))
    with pytest.raises(ValueError, match="needs every tensor in torch.float32"):
        MLPKernel(model, SupervisedTask("mse")).grad_and_value(params, x, y, w[..., 0])
