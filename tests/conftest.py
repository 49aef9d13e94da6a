"""Shared fixtures: tiny float64 models and datasets small enough for exact oracles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

# at most 2 threads (the CI machine's cores); OMP_NUM_THREADS, when set, wins (a busy shared machine
# runs much faster with 1 thread per process than with spinning OpenMP threads fighting for the cores)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The offline dataset folder beside the project; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline datasets not found at {SHARED_DATA}")
    return SHARED_DATA


def make_mlp(d_in: int = 4, hidden: int = 6, d_out: int = 1, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(dtype)


def make_regression(n: int = 24, d_in: int = 4, seed: int = 1, dtype=torch.float64) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = x.sum(dim=1) * 0.5 + 0.1 * torch.randn(n, generator=g, dtype=dtype)
    return TensorDataset(x, y)


@pytest.fixture
def mlp() -> nn.Module:
    return make_mlp()


@pytest.fixture
def regression_data() -> tuple[TensorDataset, TensorDataset]:
    return make_regression(24, seed=1), make_regression(5, seed=2)
