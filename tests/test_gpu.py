"""CUDA paths against the CPU ones (issue 14 item 7): every test is marked ``gpu`` and skips without CUDA.

Run them with ``pytest -m gpu`` (benchmarks/gpu_check.sh does). Models and data are tiny and float64,
so a CUDA result must equal the CPU result up to summation order: cosine > 0.9999 per test row and a
small relative error. Estimators whose randomness is drawn on the device (sampled Fisher, projections)
are run in their deterministic settings here. ``FIMODA_TEST_DEVICE=cpu`` runs them on the CPU against
itself, to check the tests' own logic on a machine without a GPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fimoda import (
    FurtherTrainingLoop,
    GradientCache,
    SupervisedTask,
    attribute,
    per_sample_gradients,
)
from lightning_fimoda.gradients import (
    available_memory,
    streamed_fisher_products,
    streamed_gram,
    streamed_layer_accumulate,
    streamed_products,
    streamed_sq_norms,
    streamed_transposed_products,
)
from lightning_fimoda.profiling import PeakMemory
from lightning_fimoda.projection import Projector

from .conftest import make_mlp, make_regression
from .helpers import make_classification, row_cosine

CUDA = torch.device(os.environ.get("FIMODA_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
MSE, CE = SupervisedTask("mse"), SupervisedTask("cross_entropy")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` with both on the CPU."""
    a, b = a.detach().cpu(), b.detach().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def assert_same_scores(on_cuda: torch.Tensor, on_cpu: torch.Tensor, tol: float = 1e-6, cos: float = 0.9999) -> None:
    assert on_cuda.shape == on_cpu.shape
    assert torch.isfinite(on_cuda).all()
    assert row_cosine(on_cuda.detach().cpu().double(), on_cpu.double()).min() > cos
    assert rel_err(on_cuda, on_cpu) < tol


def regression():
    return make_mlp(d_in=3, hidden=5), make_regression(24, d_in=3, seed=1), make_regression(5, d_in=3, seed=2)


def classification():
    model = make_mlp(d_in=3, hidden=5, d_out=3)
    return model, make_classification(24), make_classification(5, seed=2)


# -- per-sample gradients and streamed products ----------------------------------------------------------
def test_per_sample_gradients_on_cuda_equal_cpu():
    model, train, _ = regression()
    cpu = per_sample_gradients(model, MSE, train)
    gpu = per_sample_gradients(copy.deepcopy(model).to(CUDA), MSE, train, chunk_size=5)
    assert gpu.flat.device.type == CUDA.type
    assert rel_err(gpu.flat, cpu.flat) < 1e-12


def test_streamed_products_on_cuda_equal_cpu_and_are_recomputed_within_the_budget():
    model, train, test = regression()
    p = sum(q.numel() for q in model.parameters())
    budget = 2 * 4 * p * 8 * 4  # chunk half holds 4 rows with vmap's intermediates; nothing resident
    gpu_model = copy.deepcopy(model).to(CUDA)
    g_test = per_sample_gradients(model, MSE, test, kind="measurement").flat
    expected = per_sample_gradients(model, MSE, train).flat @ g_test.T
    stream = GradientCache(memory_budget=budget).stream(gpu_model, MSE, train, torch.arange(len(train)))
    assert stream.storage == "recomputed"
    got = streamed_products(stream, g_test.T.to(CUDA))
    assert got.device.type == CUDA.type and rel_err(got, expected) < 1e-12
    norms = streamed_sq_norms(stream)
    assert rel_err(norms, per_sample_gradients(model, MSE, train).flat.pow(2).sum(dim=1)) < 1e-12


def test_streamed_products_of_a_cuda_stream_accept_cpu_operands():
    model, train, test = regression()
    stream = GradientCache().stream(copy.deepcopy(model).to(CUDA), MSE, train, torch.arange(len(train)))
    g = per_sample_gradients(model, MSE, train).flat  # the CPU oracle [N, P]
    t = per_sample_gradients(model, MSE, test, kind="measurement").flat  # [n_test, P], CPU
    damping = dict.fromkeys(stream.layer_slices(), 0.1)
    w = {name: 1.0 / (0.1 + g[:, sl].pow(2).sum(dim=1)) for name, sl in stream.layer_slices().items()}
    checks = [
        (streamed_products(stream, t.T), g @ t.T),
        (streamed_transposed_products(stream, torch.full((len(train), 1), 1.0 / len(train), dtype=g.dtype)),
         g.mean(dim=0, keepdim=True).T),
        (streamed_fisher_products(stream, t), t @ g.T @ g),
    ]
    accumulated = streamed_layer_accumulate(stream, t, damping)
    gram = streamed_gram(stream, t, t, damping)
    for name, sl in stream.layer_slices().items():
        gl = g[:, sl]
        checks.append((accumulated[:, sl], ((t[:, sl] @ gl.T) * w[name]) @ gl))
        checks.append((gram[name], ((t[:, sl] @ gl.T) * w[name]) @ (gl @ t[:, sl].T)))
    for got, expected in checks:
        assert got.device.type == CUDA.type and rel_err(got, expected) < 1e-10


def test_projector_on_cuda_is_deterministic_and_chunking_independent():
    g = torch.randn(10, 300, dtype=torch.float64, device=CUDA)
    proj = Projector(dim=64, seed=3, block_size=70)
    whole = proj.project(g)
    parts = torch.cat([proj.project(g[:4]), proj.project(g[4:])])
    assert whole.device.type == CUDA.type and rel_err(parts, whole) < 1e-12
    assert rel_err(Projector(dim=64, seed=3, block_size=70).project(g), whole) == 0.0
    # E[(Πg)·(Πh)] = g·h: averaged over many seeds the Gram matrix is close to the exact one
    exact = g @ g.T
    mean = sum(Projector(dim=64, seed=s).project(g) @ Projector(dim=64, seed=s).project(g).T for s in range(40)) / 40
    assert rel_err(mean, exact) < 0.2


# -- estimators through attribute() ----------------------------------------------------------------------
ESTIMATORS = {
    "grad_dot": "grad_dot",
    "grad_cos": "grad_cos",
    "cg": {"name": "cg", "tol": 1e-10},
    "lissa": {"name": "lissa", "batch_size": 1000, "depth": 150},  # full batch: deterministic recursion
    "datainf": "datainf",
    "ekfac": {"name": "ekfac", "fisher": "empirical", "damping": 1e-3, "batch_size": 7},
    "trak": {"name": "trak", "proj_dim": None, "damping": 1e-3},
}


@pytest.mark.parametrize("label", list(ESTIMATORS))
@pytest.mark.parametrize("problem", [regression, classification], ids=["mse", "cross_entropy"])
def test_estimator_on_cuda_equals_cpu(label, problem):
    if label == "ekfac":
        pytest.importorskip("kronfluence")
    if label == "trak":
        pytest.importorskip("trak")
    model, train, test = problem()
    task = MSE if problem is regression else CE
    spec = ESTIMATORS[label]
    cpu = attribute(model, task, train, test, [spec])[label]
    gpu = attribute(copy.deepcopy(model).to(CUDA), task, train, test, [spec])[label]
    if label == "trak":  # traker's features are float32 whatever the model's dtype
        assert_same_scores(gpu, cpu, tol=1e-2, cos=0.999)
    else:
        assert_same_scores(gpu, cpu, tol=1e-4 if label == "ekfac" else 1e-6)


def test_projected_stream_on_cuda_tracks_exact_products():
    model, train, test = regression()
    gpu_model = copy.deepcopy(model).to(CUDA)
    g_test = per_sample_gradients(gpu_model, MSE, test, kind="measurement").flat
    exact = per_sample_gradients(gpu_model, MSE, train).flat @ g_test.T
    proj = Projector(dim=4096, seed=1)
    stream = GradientCache().stream(gpu_model, MSE, train, torch.arange(len(train)), projection=proj)
    projected = streamed_products(stream, proj.project(g_test).T)
    assert projected.device.type == CUDA.type and torch.isfinite(projected).all()
    assert row_cosine(projected.T.cpu(), exact.T.cpu()).min() > 0.9


def test_ekfac_follows_the_models_device_after_a_cpu_run():
    pytest.importorskip("kronfluence")
    from kronfluence.utils.state import State

    model, train, test = regression()
    spec = ESTIMATORS["ekfac"]
    attribute(model, MSE, train, test, [spec])  # a CPU run first, in the same process
    attribute(copy.deepcopy(model).to(CUDA), MSE, train, test, [spec])
    assert State().device.type == CUDA.type


# -- the gold standard ------------------------------------------------------------------------------------
def tiny_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    train = TensorDataset(torch.randn(23, 3, dtype=torch.float64), torch.randn(23, 1, dtype=torch.float64))
    test = TensorDataset(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
    return model, train, test


@pytest.mark.parametrize("engine", ["vectorised", "mlp", "sequential"])
def test_further_training_on_cuda_equals_cpu(engine):
    model, train, test = tiny_problem()
    settings = dict(optimizer="sgd", lr=0.05, momentum=0.9, epochs=3, batch_size=5, seeds=2, progress=False,
                    engine=engine)
    loo, test_idx = [0, 3, 22, 7], [0, 1, 2, 3]
    cpu = FurtherTrainingLoop(SupervisedTask(), **settings).run(model, train, test, loo, test_idx)
    gpu = FurtherTrainingLoop(SupervisedTask(), **settings).run(copy.deepcopy(model).to(CUDA), train, test,
                                                                loo, test_idx)
    assert rel_err(gpu.loo, cpu.loo) < 1e-9
    for adjust in cpu.adjustments:
        assert rel_err(gpu.scores(adjust), cpu.scores(adjust)) < 1e-9


# -- memory ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(CUDA.type != "cuda", reason="the CUDA caching allocator")
def test_available_memory_counts_what_the_caching_allocator_holds_unused():
    tmp = torch.empty(256 << 20, dtype=torch.uint8, device=CUDA)
    del tmp  # 256 MiB back in torch's cache, not in the driver's free memory
    free, _ = torch.cuda.mem_get_info(CUDA)
    assert available_memory(CUDA) >= free + (256 << 20)


@pytest.mark.skipif(CUDA.type != "cuda", reason="the CUDA allocator's peak")
def test_peak_memory_reports_the_cuda_allocator_peak():
    keep = torch.zeros(4 << 20, device=CUDA)  # 16 MiB already allocated: not counted
    with PeakMemory(CUDA) as meter:
        tmp = torch.ones(16 << 20, device=CUDA)  # 64 MiB, freed inside the block
        del tmp
    assert "CUDA" in meter.kind
    assert 64 << 20 <= meter.peak_bytes < (64 << 20) + (4 << 20)
    del keep
