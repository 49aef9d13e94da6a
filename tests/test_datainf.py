"""DataInf against a slow, direct implementation of SPEC §3's formula (loops over everything)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import jacrev

from lightning_fimoda import SupervisedTask, build_estimator

from .conftest import make_mlp, make_regression
from .helpers import ce, classification, flat_model, mse


def per_layer_grads(model: nn.Module, data, loss) -> dict[str, Tensor]:
    """``{layer: [n, P_l]}`` per-example gradients, computed here with jacrev."""
    theta0, call = flat_model(model)
    x, y = data.tensors
    flat = jacrev(lambda th: loss(call(th, x), y))(theta0)
    layers: dict[str, list[Tensor]] = {}
    start = 0
    for name, p in model.named_parameters():
        layers.setdefault(name.rsplit(".", 1)[0], []).append(flat[:, start : start + p.numel()])
        start += p.numel()
    return {layer: torch.cat(parts, dim=1) for layer, parts in layers.items()}


def direct_datainf(train: dict[str, Tensor], test: dict[str, Tensor], c: float) -> tuple[Tensor, dict]:
    """``τ(j, x) = Σ_l (1/λ_l)[g_xl·g_jl − (1/n) Σ_i (g_xl·g_il)(g_il·g_jl)/(λ_l + ‖g_il‖²)]``, looped."""
    n = next(iter(train.values())).shape[0]
    t = next(iter(test.values())).shape[0]
    lam = {layer: c * g.pow(2).mean().item() for layer, g in train.items()}
    out = torch.zeros(t, n, dtype=torch.float64)
    for layer, g in train.items():
        for x in range(t):
            gx = test[layer][x]
            for j in range(n):
                total = 0.0
                for i in range(n):
                    total += (gx @ g[i]) * (g[i] @ g[j]) / (lam[layer] + g[i] @ g[i])
                out[x, j] += (gx @ g[j] - total / n) / lam[layer]
    return out, lam


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_datainf_equals_the_direct_formula(loss):
    if loss == "mse":
        model, train, test, fn = make_mlp(), make_regression(14), make_regression(4, seed=5), mse
    else:
        model, train, test, fn = make_mlp(d_out=3), classification(14), classification(4, seed=5), ce
    expected, lam = direct_datainf(per_layer_grads(model, train, fn), per_layer_grads(model, test, fn), 0.1)
    est = build_estimator("datainf").fit(model, SupervisedTask(loss), train)
    torch.testing.assert_close(est.score(test), expected, rtol=1e-9, atol=1e-12)
    assert est.info["damping"] == pytest.approx(lam, rel=1e-12)


def test_scoring_a_subset_still_sums_over_the_whole_training_set():
    model, train, test = make_mlp(), make_regression(14), make_regression(3, seed=5)
    full, _ = direct_datainf(per_layer_grads(model, train, mse), per_layer_grads(model, test, mse), 0.5)
    idx = torch.tensor([9, 2, 11])
    est = build_estimator("datainf", damping_scale=0.5, chunk_size=4).fit(model, SupervisedTask(), train, idx)
    torch.testing.assert_close(est.score(test), full[:, idx], rtol=1e-9, atol=1e-12)


def test_large_damping_gives_layer_weighted_grad_dot():
    model, train, test = make_mlp(), make_regression(14), make_regression(3, seed=5)
    g_train, g_test = per_layer_grads(model, train, mse), per_layer_grads(model, test, mse)
    limit = sum(g_test[layer] @ g.T / g.pow(2).mean() for layer, g in g_train.items())
    scores = build_estimator("datainf", damping_scale=1e8).fit(model, SupervisedTask(), train).score(test)
    torch.testing.assert_close(scores * 1e8, limit, rtol=1e-6, atol=0)


def test_bad_damping_scale_raises():
    model, train = make_mlp(), make_regression(6)
    with pytest.raises(ValueError, match="damping_scale"):
        build_estimator("datainf", damping_scale=0.0).fit(model, SupervisedTask(), train)
