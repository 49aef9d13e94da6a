"""Curvature operators against dense oracles built here with torch.func on tiny float64 models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fimoda import AttributionTask, FunctionalTask, SupervisedTask
from lightning_fimoda.curvature import DEFAULT_JACOBIAN_BUDGET, CurvatureOperator

from .conftest import make_mlp, make_regression
from .helpers import ce, classification, dense_gauss_newton, dense_true_hessian, flat_model, mse


class LogCoshTask(AttributionTask):
    """A task without ``output_hessian``: the operator must fall back to torch.func.hessian."""

    def outputs(self, model, batch):
        return model(batch[0])

    def loss_from_outputs(self, outputs, batch):
        return torch.log(torch.cosh(outputs - batch[1].reshape(outputs.shape))).sum(dim=1)


def operator(model, task, data, **kwargs) -> CurvatureOperator:
    return CurvatureOperator(FunctionalTask(model, task), data, **kwargs)


@pytest.mark.parametrize("batch_size", [7, 100])
def test_true_hvp_matches_dense_hessian(batch_size):
    model, data = make_mlp(), make_regression(24)
    dense = dense_true_hessian(model, data, mse)
    op = operator(model, SupervisedTask("mse"), data, hessian="exact", batch_size=batch_size)
    v = torch.randn(5, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.apply(v), v @ dense.T, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(op.apply(v[0]), dense @ v[0], rtol=1e-9, atol=1e-10)


BUDGETS = {"matrix-free": 0, "cached jacobians": DEFAULT_JACOBIAN_BUDGET}


@pytest.mark.parametrize("products", list(BUDGETS))
@pytest.mark.parametrize("batch_size", [5, 100])
def test_gnvp_matches_explicit_jt_h_j_for_mse(batch_size, products):
    model, data = make_mlp(d_out=2), make_regression(16)
    data = TensorDataset(data.tensors[0], torch.stack([data.tensors[1], -data.tensors[1]], dim=1))
    dense = dense_gauss_newton(model, data, lambda o, y: 2 * torch.eye(2, dtype=o.dtype).expand(len(o), 2, 2))
    op = operator(model, SupervisedTask("mse"), data, batch_size=batch_size, damping=0.3,
                  jacobian_budget=BUDGETS[products])
    assert op.products == products
    eye = torch.eye(op.num_params, dtype=torch.float64)
    torch.testing.assert_close(op.dense(chunk=11), dense + 0.3 * eye, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("products", list(BUDGETS))
def test_gnvp_matches_explicit_jt_h_j_for_cross_entropy(products):
    model, data = make_mlp(d_out=3), classification()

    def softmax_hessian(o, y):
        p = o.softmax(dim=1)
        return torch.diag_embed(p) - torch.einsum("ni,nj->nij", p, p)

    dense = dense_gauss_newton(model, data, softmax_hessian)
    op = operator(model, SupervisedTask("cross_entropy"), data, batch_size=6, jacobian_budget=BUDGETS[products])
    assert op.products == products
    torch.testing.assert_close(op.dense(), dense, rtol=1e-9, atol=1e-10)
    # the true Hessian of cross-entropy differs from its Gauss-Newton part off a minimum
    true = operator(model, SupervisedTask("cross_entropy"), data, hessian="exact").dense()
    torch.testing.assert_close(true, dense_true_hessian(model, data, ce), rtol=1e-9, atol=1e-10)
    assert (true - dense).abs().max() > 1e-3


@pytest.mark.parametrize("products", list(BUDGETS))
def test_gnvp_falls_back_to_autodiff_output_hessian(products):
    model, data = make_mlp(), make_regression(12)
    assert LogCoshTask.output_hessian is AttributionTask.output_hessian  # the autodiff default

    def logcosh_hessian(o, y):
        return torch.diag_embed(1 - torch.tanh(o - y.reshape(o.shape)).pow(2))

    dense = dense_gauss_newton(model, data, logcosh_hessian)
    op = operator(model, LogCoshTask(), data, batch_size=5, jacobian_budget=BUDGETS[products])
    torch.testing.assert_close(op.dense(), dense)


def test_jacobians_are_cached_only_within_the_budget_and_subsets_share_them():
    model, data = make_mlp(d_out=2), make_regression(18)
    data = TensorDataset(data.tensors[0], torch.stack([data.tensors[1], 2 * data.tensors[1]], dim=1))
    task = SupervisedTask("mse")
    p = sum(q.numel() for q in model.parameters())
    exact = 18 * 2 * p * 8  # n · O · P float64 entries
    assert operator(model, task, data, jacobian_budget=exact).products == "cached jacobians"
    assert operator(model, task, data, jacobian_budget=exact - 1).products == "matrix-free"
    assert operator(model, task, data, hessian="exact").products == "matrix-free"
    cached = operator(model, task, data, batch_size=4, damping=0.1)
    free = operator(model, task, data, batch_size=4, damping=0.1, jacobian_budget=0)
    pos = torch.tensor([1, 7, 8, 16])
    v = torch.randn(3, p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cached.subset(pos).apply(v), free.subset(pos).apply(v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cached.with_damping(2.0).apply(v), free.with_damping(2.0).apply(v),
                               rtol=1e-10, atol=1e-12)
    assert cached.subset(pos).products == "cached jacobians" and free.subset(pos).products == "matrix-free"


def test_gauss_newton_equals_true_hessian_for_a_linear_model():
    torch.manual_seed(0)
    model, data = nn.Linear(4, 1).double(), make_regression(20)
    gn = operator(model, SupervisedTask("mse"), data).dense()
    true = operator(model, SupervisedTask("mse"), data, hessian="exact").dense()
    torch.testing.assert_close(gn, true)


def test_risk_gradient_and_subset():
    model, data = make_mlp(), make_regression(18)
    theta0, call = flat_model(model)
    x, y = data.tensors
    expected = torch.func.grad(lambda th: mse(call(th, x), y).mean())(theta0)
    op = operator(model, SupervisedTask("mse"), data, batch_size=4, hessian="exact")
    torch.testing.assert_close(op.risk_gradient(), expected)
    sub = op.subset(torch.tensor([2, 5, 11]))
    assert sub.n == 3
    small = TensorDataset(x[[2, 5, 11]], y[[2, 5, 11]])
    torch.testing.assert_close(sub.dense(), dense_true_hessian(model, small, mse))
    torch.testing.assert_close(op.with_damping(2.0).dense() - op.dense(), 2.0 * torch.eye(op.num_params, dtype=torch.float64))


def test_operator_restores_training_mode_and_rejects_bad_input():
    model, data = make_mlp(), make_regression(8)
    model.train()
    op = operator(model, SupervisedTask("mse"), data)
    op.apply(torch.zeros(op.num_params, dtype=torch.float64))
    assert model.training
    with pytest.raises(ValueError, match=r"\[P\] or \[k, P\]"):
        op.apply(torch.zeros(3, op.num_params + 1))
    with pytest.raises(ValueError, match="hessian must be one of"):
        operator(model, SupervisedTask("mse"), data, hessian="fisher")
    with pytest.raises(ValueError, match="damping"):
        operator(model, SupervisedTask("mse"), data, damping=-1.0)


def test_softmax_factor_drops_the_zero_curvature_direction():
    """Cross-entropy's output Hessian diag(p) − ppᵀ has rank O − 1: the cached factor keeps O − 1 rows per
    example (half the work for binary classification) and still gives the exact product."""
    model, data = make_mlp(d_out=2), classification(classes=2)
    op = operator(model, SupervisedTask("cross_entropy"), data, batch_size=7)
    assert op.kind.factor(op).rows.shape[0] == len(data)
    one_row_each = len(data) * op.num_params * 8  # the budget counts the rows kept, not n · O · P
    assert operator(model, SupervisedTask("cross_entropy"), data, jacobian_budget=one_row_each).products \
        == "cached jacobians"
    assert operator(model, SupervisedTask("cross_entropy"), data, jacobian_budget=one_row_each - 1).products \
        == "matrix-free"
    free = operator(model, SupervisedTask("cross_entropy"), data, jacobian_budget=0)
    torch.testing.assert_close(op.dense(), free.dense(), rtol=1e-9, atol=1e-12)
