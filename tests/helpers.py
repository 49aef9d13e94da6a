"""Oracles and small problems shared by several test modules (independent of the package's maths)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap
from torch.utils.data import TensorDataset

from lightning_fimoda import SupervisedTask

from .conftest import make_mlp, make_regression

MSE, CE = SupervisedTask("mse"), SupervisedTask("cross_entropy")


def loop_oracle(model, task, dataset, indices, method="per_example_loss", names=None):
    """One autograd backward per example: the slow, obvious reference."""
    named = dict(model.named_parameters())
    names = names or [n for n, p in named.items() if p.requires_grad]
    rows = []
    was_training = model.training
    model.eval()
    for i in indices:
        batch = task.collate([dataset[i]])
        value = getattr(task, method)(model, batch)
        grads = torch.autograd.grad(value.sum(), [named[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    model.train(was_training)
    return torch.stack(rows)


def flat_model(model: nn.Module):
    """``(theta0 [P], call(theta, x) -> outputs)`` for a model, independent of the package."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def call(theta: Tensor, x: Tensor) -> Tensor:
        out, start = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = theta[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        return functional_call(model, out, (x,))

    return theta0, call


def dense_true_hessian(model: nn.Module, data: TensorDataset, loss) -> Tensor:
    theta0, call = flat_model(model)
    x, y = data.tensors
    return hessian(lambda th: loss(call(th, x), y).mean())(theta0)


def dense_gauss_newton(model: nn.Module, data: TensorDataset, out_hessian) -> Tensor:
    """``(1/n) Σ_i J_iᵀ H_o,i J_i`` with per-example Jacobians ``J_i`` ``[O, P]``."""
    theta0, call = flat_model(model)
    x, y = data.tensors
    jac = jacrev(lambda th: call(th, x))(theta0)  # [n, O, P]
    h_o = out_hessian(call(theta0, x).detach(), y)  # [n, O, O]
    return torch.einsum("nop,noq,nqr->pr", jac, h_o, jac) / x.shape[0]


def mse(out: Tensor, y: Tensor) -> Tensor:
    return (out - y.reshape(out.shape)).pow(2).sum(dim=1)


def ce(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def classification(n: int = 20, d_in: int = 4, classes: int = 3, seed: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.randint(0, classes, (n,), generator=g))


def make_classification(n: int = 30, d_in: int = 3, classes: int = 3, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(d_in, classes, generator=g, dtype=torch.float64)
    y = (x @ w + 0.8 * torch.randn(n, classes, generator=g, dtype=torch.float64)).argmax(dim=1)
    return TensorDataset(x, y)


def fit_to_convergence(model: nn.Module, task: SupervisedTask, data: TensorDataset, steps: int = 200) -> nn.Module:
    """Full-batch L-BFGS in float64: the final model is (numerically) a minimiser of the risk."""
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=steps, tolerance_grad=1e-12,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = task.per_example_loss(model, data.tensors).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return model


REFIT_STEPS, REFIT_LR = 250, 0.02
SIGN_DAMPING = 1.0 / (REFIT_STEPS * REFIT_LR)  # K gradient steps of size η ≈ an influence function with λ = 1/(ηK)


def refit_test_losses(model: nn.Module, task: SupervisedTask, train: TensorDataset, test: TensorDataset,
                      drops: list[int | None]) -> Tensor:
    """Test losses ``[len(drops), T]`` after ``REFIT_STEPS`` full-batch gradient steps from ``θ̂`` on
    ``(1/n) Σ_{i≠drop} ℓ_i``, all refits at once (``drop=None``: the full objective, whose refit cancels
    any non-stationarity of ``θ̂``)."""
    weights = torch.ones(len(drops), len(train), dtype=torch.float64)
    for row, drop in enumerate(drops):
        if drop is not None:
            weights[row, drop] = 0.0

    def risk(params: dict[str, Tensor], w: Tensor) -> Tensor:
        out = functional_call(model, params, (train.tensors[0],)).reshape(len(train), -1)
        return (task.loss_from_outputs(out, train.tensors) * w).sum() / len(train)

    params = {n: p.detach().expand(len(drops), *p.shape).clone() for n, p in model.named_parameters()}
    step = vmap(grad(risk))
    for _ in range(REFIT_STEPS):
        grads = step(params, weights)
        params = {n: p - REFIT_LR * grads[n] for n, p in params.items()}

    def test_losses(p: dict[str, Tensor]) -> Tensor:
        out = functional_call(model, p, (test.tensors[0],)).reshape(len(test), -1)
        return task.loss_from_outputs(out, test.tensors)

    return vmap(test_losses)(params)


def dense_gauss_newton_scores(model: nn.Module, task: SupervisedTask, train: TensorDataset,
                              test: TensorDataset, damping: float) -> Tensor:
    """``(1/n) g_x (H_GN + λI)^{-1} g_jᵀ`` with ``H_GN = (1/n) Σ J_iᵀ ∇²_o ℓ_i J_i`` (dense, jacrev)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)

    def flat_jac(data: TensorDataset, fn) -> Tensor:
        jac = jacrev(fn)(params, data)
        return torch.cat([jac[n].reshape(*jac[n].shape[: -params[n].dim()], -1) for n in names], dim=-1)

    outputs = lambda p, d: functional_call(model, p, (d.tensors[0],)).reshape(len(d), -1)  # noqa: E731
    losses = lambda p, d: task.loss_from_outputs(outputs(p, d), d.tensors)  # noqa: E731
    j_out = flat_jac(train, outputs)  # [n, O, P]
    h_out = task.output_hessian(outputs(params, train), train.tensors)  # [n, O, O]
    n, num = len(train), j_out.shape[-1]
    gn = torch.einsum("nop,noq,nqr->pr", j_out, h_out, j_out) / n
    g_train, g_test = flat_jac(train, losses), flat_jac(test, losses)
    return g_test @ torch.linalg.solve(gn + damping * torch.eye(num, dtype=gn.dtype), g_train.T) / n


def row_cosine(a: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def assert_signs_match_refits(scores: Tensor, model, task, train, test) -> None:
    """For every test row, leaving out the most positive example raises the test loss (after the refit,
    relative to the full refit), and leaving out the most negative one lowers it."""
    top, bottom = scores.argmax(dim=1).tolist(), scores.argmin(dim=1).tolist()
    rows = torch.arange(len(test))
    assert (scores[rows, top] > 0).all() and (scores[rows, bottom] < 0).all(), scores
    losses = refit_test_losses(model, task, train, test, [None, *top, *bottom])
    full, up, down = losses[0], losses[1 : 1 + len(test)], losses[1 + len(test) :]
    assert (up[rows, rows] > full).all(), (up[rows, rows] - full, top)
    assert (down[rows, rows] < full).all(), (down[rows, rows] - full, bottom)


def trained_mlp() -> tuple[nn.Module, TensorDataset, TensorDataset]:
    """A tiny float64 tanh MLP (P = 26) trained part of the way: not stationary, true H ≠ GN."""
    model = make_mlp(d_in=3, hidden=5)
    train, test = make_regression(30, d_in=3, seed=1), make_regression(6, d_in=3, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = train.tensors
    for _ in range(300):
        opt.zero_grad()
        mse(model(x), y).mean().backward()
        opt.step()
    return model, train, test


def assert_matches_torch_optim(opt, start: dict, grads: list, sit_out: int, clip: float | None = None) -> None:
    """Run ``opt`` (a ``StackedOptimizer``) over 3 stacked models and ``torch.optim`` on each model alone
    (the oracle) with the same gradients; model 1 sits out step ``sit_out``; optional norm clipping."""
    from lightning_fimoda.further_training.optimizers import clip_grad_norm

    stacked = {n: p.clone() for n, p in start.items()}
    state = opt.init(stacked)
    active = torch.tensor([True, False, True])
    for step, g in enumerate(grads):
        opt.step(stacked, clip_grad_norm(g, clip) if clip else g, state, active if step == sit_out else None)
    for k in range(3):
        ref = {n: p[k].clone().requires_grad_() for n, p in start.items()}
        torch_opt = opt.torch_optimizer(ref.values())
        for step, g in enumerate(grads):
            if step == sit_out and not active[k]:
                continue
            for n, p in ref.items():
                p.grad = g[n][k].clone()
            if clip:
                torch.nn.utils.clip_grad_norm_(list(ref.values()), clip)
            torch_opt.step()
        for n in start:
            torch.testing.assert_close(stacked[n][k], ref[n].detach(), rtol=1e-12, atol=1e-14)
