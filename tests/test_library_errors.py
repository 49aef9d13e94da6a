"""kronfluence and traker errors reach the user as ours, saying what to do (issue 13.5)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_fimoda import SupervisedTask, build_estimator
from lightning_fimoda.estimators._library import library_errors
from lightning_fimoda.exceptions import ConfigurationError, MissingExtraError, NonFiniteError

from .conftest import make_mlp, make_regression

MSE = SupervisedTask("mse")


def nan_data() -> TensorDataset:
    x, y = make_regression(12, d_in=3).tensors
    x = x.clone()
    x[3, 1] = float("nan")
    return TensorDataset(x, y)


@pytest.mark.parametrize("name", ["ekfac", "trak"])
def test_non_finite_training_data_gives_a_non_finite_error_naming_the_fix(name):
    kwargs = {"proj_dim": None} if name == "trak" else {}
    with pytest.raises(NonFiniteError, match=r"(?s)training data.*finite"):
        est = build_estimator(name, damping=0.1, **kwargs).fit(make_mlp(d_in=3), MSE, nan_data())
        est.score(make_regression(2, d_in=3))


def test_library_errors_wraps_foreign_errors_and_passes_ours():
    wrapped = pytest.raises(NonFiniteError, match="ekfac: kronfluence failed on non-finite")
    with wrapped as info, library_errors("ekfac", "kronfluence"):
        torch.linalg.cholesky(torch.full((2, 2), float("nan")))
    assert isinstance(info.value.__cause__, torch.linalg.LinAlgError)
    wrapped = pytest.raises(ConfigurationError, match=r"trak: traker failed \(KeyError: 'grads'\)")
    with wrapped, library_errors("trak", "traker"):
        raise KeyError("grads")
    with pytest.raises(MissingExtraError), library_errors("trak", "traker"):
        raise MissingExtraError("install it")
