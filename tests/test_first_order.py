"""Grad-Dot and Grad-Cos against exact one-step leave-one-out further training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_fimoda import SupervisedTask, attribute, build_estimator
from lightning_fimoda.functional import FunctionalTask

from .conftest import make_mlp, make_regression


def one_step_loo_change(model, task, train, test, lr):
    """Exact ``f(x; θ^{-j}) − f(x; θ^{full})`` after one full-batch gradient step (subtract trick)."""
    fn = FunctionalTask(model, task)
    x_train = task.collate([train[i] for i in range(len(train))])
    x_test = task.collate([test[i] for i in range(len(test))])
    n = len(train)

    def step(weights):  # weights [n]: per-example weight of the loss
        params = {k: v.clone().requires_grad_() for k, v in fn.params.items()}
        loss = (fn.loss(params, x_train) * weights).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        return {k: v.detach() - lr * g for (k, v), g in zip(params.items(), grads)}

    full_weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    f_full = fn.measurement(step(full_weights), x_test)
    changes = []
    for j in range(n):
        w = full_weights.clone()
        w[j] -= 1.0 / n  # L = mean ℓ − (1/n) ℓ_j
        changes.append(fn.measurement(step(w), x_test) - f_full)
    return torch.stack(changes, dim=1)  # [n_test, n]


def test_grad_dot_equals_one_step_loo_further_training():
    model, task = make_mlp(), SupervisedTask("mse")
    train, test = make_regression(20, seed=1), make_regression(6, seed=2)
    lr = 1e-4
    exact = one_step_loo_change(model, task, train, test, lr)
    scores = attribute(model, task, train, test, ["grad_dot"])["grad_dot"]
    predicted = lr / len(train) * scores
    cos = F.cosine_similarity(predicted, exact, dim=1)
    assert (cos > 0.999).all(), cos
    big = exact.abs() > exact.abs().max() * 1e-2
    assert torch.equal(torch.sign(predicted[big]), torch.sign(exact[big]))
    torch.testing.assert_close(predicted, exact, rtol=0.02, atol=exact.abs().max().item() * 1e-3)


def test_grad_cos_is_normalised_grad_dot():
    model, task = make_mlp(), SupervisedTask("mse")
    train, test = make_regression(12, seed=1), make_regression(4, seed=2)
    out = attribute(model, task, train, test, ["grad_dot", "grad_cos"])
    est = build_estimator("grad_dot").fit(model, task, train)
    g_train = est.train_gradients().flat
    g_test = est.test_gradients(test, torch.arange(4)).flat
    want = out["grad_dot"] / (g_test.norm(dim=1, keepdim=True) * g_train.norm(dim=1))
    torch.testing.assert_close(out["grad_cos"], want)
    assert out["grad_cos"].abs().max() <= 1 + 1e-12


def test_grad_cos_zero_gradient_scores_zero():
    model, task = make_mlp(), SupervisedTask("mse")
    train = make_regression(5)
    # a test example predicted exactly has zero loss gradient
    x = train.tensors[0][:1]
    with torch.no_grad():
        y = model(x)[:, 0]
    test = torch.utils.data.TensorDataset(x, y)
    scores = attribute(model, task, train, test, ["grad_cos"])["grad_cos"]
    assert torch.equal(scores, torch.zeros_like(scores))
