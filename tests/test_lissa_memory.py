"""Curvature products within the estimator's memory budget (issue 14): LiSSA's products with ``k``
stacked tangents over a batch of ``B`` examples hold ``k · B`` pairs of activation tangents; the operator
splits tangents and examples to fit its ``memory_budget`` and gives the same numbers.

The budget test fits and runs LiSSA (Gauss-Newton matrix-free and from the cached factor, exact Hessian)
on operators with ``memory_budget=B`` over a small convolutional net whose activations (not its
parameters) are large, so an unchunked product over one batch of all ``n`` examples with ``k`` tangents
needs over 6x ``B`` in saved activations alone; the peak (process RSS above the start, measured in a fresh
spawned process as in test_estimators_streaming.py) must stay under ``B`` + model + ``SLACK``. (The
estimators give the operator the half of their budget that a gradient chunk gets.)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fimoda import FunctionalTask, SupervisedTask
from lightning_fimoda.curvature import CurvatureOperator
from lightning_fimoda.curvature.chunking import TANGENT_ROWS, plan_chunks, slice_batch
from lightning_fimoda.profiling import PeakMemory
from lightning_fimoda.solvers import LissaConfig, LissaSolver

BUDGET = 32 << 20
# Beyond the budget: one example's forward pass outside vmap (the activation measurement), the loaded
# training batch and allocator slack. Measured here: 26.6 MiB peak in all for B = 32 MiB; the old
# unchunked products (and factor fill) peaked at 893 MiB on the same solves.
SLACK = 12 << 20
N_TRAIN, N_TEST = 256, 8
LISSA = {"depth": 4, "batch_size": 64, "tol": 0.0}
CURVATURES = {"matrix_free": {"jacobian_budget": 0}, "factor": {},
              "exact": {"hessian": "exact", "jacobian_budget": 0, "check_definite": False}}
MSE = SupervisedTask("mse")


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 16, 3, padding=1), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 1),
    ).double()


def _images(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=gen, dtype=torch.float64)
    return TensorDataset(x, x.mean(dim=(1, 2, 3)) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64))


def _lissa_solves(n: int, budget: int) -> dict[str, torch.Tensor]:
    """LiSSA (fit and solve for ``N_TEST`` right-hand sides) with each curvature within ``budget``."""
    fn = FunctionalTask(_convnet(), MSE)
    rhs = torch.randn(N_TEST, fn.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = {}
    for label, kwargs in CURVATURES.items():
        kwargs = dict(kwargs)
        config = LissaConfig(check_definite=kwargs.pop("check_definite", True), **LISSA)
        op = CurvatureOperator(fn, _images(n, 1), damping=0.1, memory_budget=budget, **kwargs)
        out[label] = LissaSolver(config).fit(op).solve(rhs)[0]
    return out


@contextlib.contextmanager
def _fixed_mmap_threshold() -> Iterator[None]:
    """Processes started inside get glibc's mmap threshold fixed at 64 KiB. By default glibc raises the
    threshold to the size of each large block freed, so later blocks of that size come from the heap and
    stay resident after they are freed: the RSS then counts memory no tensor holds (measured: a product
    of one tangent peaked at 40 MiB above the start by default, 12 MiB with the threshold fixed)."""
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        yield
    finally:
        if old is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old


def _measured_run(_: int = 0) -> tuple[int, dict]:
    """Peak RSS of the budgeted solves and their results (in a fresh process)."""
    torch.set_num_threads(1)
    _lissa_solves(64, BUDGET)  # warm-up: allocator, kernels
    with PeakMemory("cpu") as meter:
        got = _lissa_solves(N_TRAIN, BUDGET)
    return meter.peak_bytes, got


def test_lissa_products_stay_within_the_memory_budget_and_equal_unchunked():
    model, train = _convnet(), _images(N_TRAIN, 1)
    model_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    op = CurvatureOperator(FunctionalTask(model, MSE), train, damping=0.1)
    unchunked_pairs = N_TRAIN * N_TEST * op.example_activation_bytes()
    assert unchunked_pairs > 6 * BUDGET  # one unchunked product's saved activations alone
    with _fixed_mmap_threshold(), multiprocessing.get_context("spawn").Pool(1) as pool:
        peak, got = pool.map(_measured_run, [0])[0]
    assert peak < BUDGET + model_bytes + SLACK, peak / 2**20
    want = _lissa_solves(N_TRAIN, 1 << 34)
    for label, value in want.items():
        torch.testing.assert_close(got[label], value, rtol=1e-9, atol=1e-12, msg=label)


def test_chunked_products_equal_one_batch_products():
    model, train = _convnet(), _images(40, 1)
    fn = FunctionalTask(model, MSE)
    v = torch.randn(5, fn.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for hessian in ("gauss_newton", "exact"):
        whole = CurvatureOperator(fn, train, hessian=hessian, damping=0.1, memory_budget=1 << 34, jacobian_budget=0)
        row, act = fn.num_params * 8, whole.example_activation_bytes()
        pair, example = whole.kind.pair_factor * act, whole.kind.example_factor * act
        budget = 2 * 5 * row + 2 * TANGENT_ROWS * row + 8 * (example + 2 * pair)  # 2 tangents on 8 examples
        tight = CurvatureOperator(fn, train, hessian=hessian, damping=0.1, jacobian_budget=0, memory_budget=int(budget))
        torch.testing.assert_close(tight.apply(v), whole.apply(v), rtol=1e-10, atol=1e-12)
        assert whole.last_chunks == (5, 40) and tight.last_chunks[0] < 5 and tight.last_chunks[1] < 40, tight.last_chunks


def test_gauss_newton_factor_filled_in_slices_equals_matrix_free():
    model, train = _convnet(), _images(40, 1)
    fn = FunctionalTask(model, MSE)
    v = torch.randn(3, fn.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    free = CurvatureOperator(fn, train, damping=0.1, jacobian_budget=0)
    sliced = CurvatureOperator(fn, train, damping=0.1, memory_budget=fn.num_params * 8 * 3 * 5)
    assert sliced.products == "cached jacobians"
    torch.testing.assert_close(sliced.apply(v), free.apply(v), rtol=1e-10, atol=1e-12)


def test_plan_chunks_counts_the_rows_examples_and_pairs():
    # room after the 2k = 8 rows: 100 - 8 = 92 bytes; (92 - 8 * 1) // (4 + 8 * 1) = 7 >= 4 tangents;
    # examples (92 - 16) // (1 + 4) = 15 -> all 10
    assert plan_chunks(4, 10, 1, 1, 1, 100) == (4, 10)
    assert plan_chunks(4, 10, 1, 1, 1, 40) == (2, 8)  # room 32: (32 - 8) // 12 = 2 tangents, (32 - 8) // 3 = 8
    assert plan_chunks(4, 100, 1, 0, 10, 40) == (1, 2)  # room 32 < 1 tangent on 8 examples: (32 - 4) // 10 = 2
    assert plan_chunks(4, 100, 1, 1, 10, 1) == (1, 1)  # never below one tangent and one example
    batch = (torch.arange(6).reshape(3, 2), torch.arange(3), "tag")
    part = slice_batch(batch, 1, 3)
    assert torch.equal(part[0], batch[0][1:3]) and torch.equal(part[1], batch[1][1:3]) and part[2] == "tag"


def test_gauss_newton_factor_of_a_rank_with_no_examples_is_empty():
    """A rank whose shard is empty has no batches: its factor has no rows (it must not index a first
    batch that does not exist), and it still takes part in the ranks' agreement on the factor."""
    from lightning_fimoda.curvature.gauss_newton import GaussNewton

    model, train = _convnet(), _images(4, 1)
    op = CurvatureOperator(FunctionalTask(model, MSE), train, damping=0.1)
    op.batches = list  # as on a rank past the end of the data: no batches
    factor = GaussNewton().factor(op)
    assert factor.rows.shape == (0, op.num_params)
