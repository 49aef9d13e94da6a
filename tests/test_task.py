"""Attribution tasks: loss conventions, output Hessians, task resolution."""

from __future__ import annotations

import pytest
import torch
from torch.func import hessian

from lightning_fimoda import AttributionTask, SupervisedTask
from lightning_fimoda.task import resolve_task

from .conftest import make_mlp


def test_mse_has_no_half_factor_and_sums_outputs():
    task = SupervisedTask("mse")
    out = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    y = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    torch.testing.assert_close(task.loss_from_outputs(out, (None, y)), torch.tensor([5.0, 10.0]))


def test_cross_entropy_per_example():
    task = SupervisedTask("cross_entropy")
    out = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    want = -torch.log_softmax(out, dim=1)[torch.arange(2), y]
    torch.testing.assert_close(task.loss_from_outputs(out, (None, y)), want)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_output_hessian_matches_autograd(loss):
    task = SupervisedTask(loss)
    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 4, generator=g, dtype=torch.float64) if loss == "mse" else torch.tensor([0, 3, 1])
    closed = task.output_hessian(out, (None, y))
    for b in range(3):
        auto = hessian(lambda o, b=b: task.loss_from_outputs(o.unsqueeze(0), (None, y[b : b + 1]))[0])(out[b])
        torch.testing.assert_close(closed[b], auto)


def test_unknown_loss():
    with pytest.raises(ValueError, match="choose one of"):
        SupervisedTask("hinge")


def test_resolve_task():
    model = make_mlp()
    with pytest.raises(ValueError, match="attribution_task"):
        resolve_task(model)
    model.attribution_task = lambda: SupervisedTask("mse")
    assert isinstance(resolve_task(model), SupervisedTask)
    explicit = SupervisedTask("cross_entropy")
    assert resolve_task(model, explicit) is explicit
    model.attribution_task = lambda: "mse"
    with pytest.raises(TypeError, match="expected an AttributionTask"):
        resolve_task(model)


def test_base_task_needs_outputs_for_gauss_newton():
    with pytest.raises(NotImplementedError, match="Gauss-Newton methods need it"):
        AttributionTask().outputs(make_mlp(), None)
