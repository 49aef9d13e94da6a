"""Registry, attribute() and error handling of bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_fimoda as lf
from lightning_fimoda import Estimator, SupervisedTask, attribute, build_estimator, register_estimator
from lightning_fimoda.attribute import run_estimators
from lightning_fimoda.gradients import GradientCache

from .conftest import make_mlp, make_regression


def test_registry_lists_and_builds():
    names = lf.available_estimators()
    assert {"grad_dot", "grad_cos"} <= set(names)
    est = build_estimator("grad_dot", label="mine")
    assert est.label == "mine" and est.name == "grad_dot"


def test_unknown_estimator_lists_available():
    with pytest.raises(KeyError, match="Available: .*grad_cos.*grad_dot"):
        build_estimator("grad_dott")


def test_bad_keyword_lists_allowed():
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['dampin'\]. Allowed: params, label"):
        build_estimator("grad_dot", dampin=1.0)


def test_register_custom_estimator_and_duplicate_labels():
    @register_estimator("test_constant")
    class Constant(Estimator):
        def __init__(self, *, value: float = 1.0, params=None, label=None):
            super().__init__(params=params, label=label)
            self.value = value

        def _fit(self):
            pass

        def _score(self, test_dataset, test_indices):
            return torch.full((test_indices.numel(), self.train_indices_.numel()), self.value)

    model, task = make_mlp(), SupervisedTask("mse")
    train, test = make_regression(5), make_regression(3)
    out = attribute(model, task, train, test, [build_estimator("test_constant", value=2.0), "grad_dot"])
    assert set(out) == {"test_constant", "grad_dot"}
    assert torch.equal(out["test_constant"], torch.full((3, 5), 2.0))
    assert build_estimator("test_constant", value=3.0).settings()["value"] == 3.0
    with pytest.raises(ValueError, match="Duplicate estimator labels"):
        attribute(model, task, train, test, ["grad_dot", "grad_dot"])


def test_attribute_shares_gradients_and_respects_indices():
    model, task = make_mlp(), SupervisedTask("mse")
    train, test = make_regression(10), make_regression(4)
    cache = GradientCache()
    runs = run_estimators(model, task, train, test, ["grad_dot", "grad_cos"], cache=cache)
    assert cache.computed == 2  # training and test gradients, once each for both estimators
    assert [r.label for r in runs] == ["grad_dot", "grad_cos"] and all(r.seconds > 0 for r in runs)
    out = attribute(model, task, train, test, ["grad_dot", "grad_cos"], train_indices=[1, 3, 5], test_indices=[0, 2])
    full = attribute(model, task, train, test, ["grad_dot"])["grad_dot"]
    assert out["grad_dot"].shape == (2, 3)
    torch.testing.assert_close(out["grad_dot"], full[[0, 2]][:, [1, 3, 5]])


def test_attribute_restores_model_mode():
    model, task = make_mlp(), SupervisedTask("mse")
    model.train()
    attribute(model, task, make_regression(4), make_regression(2), "grad_dot")
    assert model.training


def test_score_before_fit_is_an_error():
    with pytest.raises(RuntimeError, match="before fit"):
        build_estimator("grad_dot").score(make_regression(2))


# -- bad input -------------------------------------------------------------------------------------

def test_item_the_task_cannot_unpack():
    data = TensorDataset(torch.randn(4, 4, dtype=torch.float64))  # items are 1-tuples, no target
    with pytest.raises(TypeError, match=r"expects dataset items / batches of the form \(x, y\)"):
        attribute(make_mlp(), SupervisedTask("mse"), data, data, "grad_dot")


def test_loss_that_is_not_per_example():
    class MeanLoss(SupervisedTask):
        def per_example_loss(self, model, batch):
            return super().per_example_loss(model, batch).mean()

    data = make_regression(4)
    with pytest.raises(ValueError, match=r"returned shape \(\) for a batch of 2 examples; expected \[B\]"):
        attribute(make_mlp(), MeanLoss("mse"), data, data, "grad_dot")


def test_non_finite_loss_and_gradients():
    x, y = make_regression(4).tensors
    bad_y = y.clone()
    bad_y[0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        attribute(make_mlp(), SupervisedTask("mse"), TensorDataset(x, bad_y), make_regression(2), "grad_dot")

    class SqrtTask(SupervisedTask):  # finite loss, infinite gradient at zero
        def per_example_loss(self, model, batch):
            loss = super().per_example_loss(model, batch)
            return torch.sqrt(loss - loss.detach())  # value 0, derivative of sqrt at 0 is infinite

    with pytest.raises(FloatingPointError, match=r"Non-finite per-sample gradients .* indices \[0, 1, 2, 3\]"):
        attribute(make_mlp(), SqrtTask("mse"), make_regression(4), make_regression(2), "grad_dot")


def test_indices_out_of_range_and_empty():
    model, task, data = make_mlp(), SupervisedTask("mse"), make_regression(5)
    with pytest.raises(IndexError, match=r"out of range for a dataset of 5 items: \[7\]"):
        attribute(model, task, data, data, "grad_dot", train_indices=[0, 7])
    with pytest.raises(IndexError, match="test indices out of range"):
        attribute(model, task, data, data, "grad_dot", test_indices=[-1])
    empty = TensorDataset(torch.empty(0, 4, dtype=torch.float64), torch.empty(0, dtype=torch.float64))
    with pytest.raises(ValueError, match="training dataset is empty"):
        attribute(model, task, empty, data, "grad_dot")
    with pytest.raises(ValueError, match="selection is empty"):
        attribute(model, task, data, data, "grad_dot", train_indices=[])
    with pytest.raises(ValueError, match="duplicates"):
        attribute(model, task, data, data, "grad_dot", train_indices=[1, 1])


def test_model_without_trainable_parameters():
    model = make_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        attribute(model, SupervisedTask("mse"), make_regression(3), make_regression(2), "grad_dot")


def test_wrong_target_shape():
    model = nn.Linear(4, 2).double()
    with pytest.raises(ValueError, match="same number of values per example"):
        attribute(model, SupervisedTask("mse"), make_regression(3), make_regression(2), "grad_dot")
