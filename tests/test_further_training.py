"""FurtherTrainingLoop (SPEC §2): vectorised engine vs the sequential torch.optim oracle, semantics of
one step against hand-written updates, adjustments, cost estimate and input validation."""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad
from torch.utils.data import TensorDataset

from lightning_fimoda import GoldStandard, SupervisedTask
from lightning_fimoda.further_training import FurtherTrainingLoop, epoch_permutation
from lightning_fimoda.further_training.mlp import MLPKernel
from lightning_fimoda.further_training.native import CompiledStep
from lightning_fimoda.further_training.native import load as load_native

from .helpers import assert_matches_torch_optim

N = 23
LOO = [0, 3, 22, 7, 11]
ENGINES = ["vectorised", "mlp"]


def native_runs(path: str | None) -> bool:
    """Whether :func:`mlp_path` ``path`` runs the compiled step (on two threads: when built with OpenMP)."""
    parallel = load_native()[0] is not None and load_native()[0].parallel
    return path == "native" or (path == "native-2" and parallel)


@contextlib.contextmanager
def mlp_path(path: str | None):
    """Force the MLP kernel's path: ``"bmm"``, ``"native"`` (the compiled step, checked to have run, on one
    thread) or ``"native-2"`` (on two: members split over threads), or as is."""
    threads = torch.get_num_threads()
    if path is not None and path.startswith("native"):
        assert load_native()[1] is None, load_native()[1]
        torch.set_num_threads(2 if path == "native-2" else 1)
    step = CompiledStep.__call__
    spy = mock.patch.object(CompiledStep, "__call__", autospec=True, side_effect=step)
    bmm = mock.patch.object(MLPKernel, "_uses_native", return_value=False)
    try:
        with bmm if path == "bmm" else contextlib.nullcontext(), spy as called:
            yield
        assert called.called == native_runs(path)
    finally:
        torch.set_num_threads(threads)


def problem(n: int = N, dropout: bool = False):
    torch.manual_seed(0)
    layers = [nn.Linear(3, 6), nn.Tanh()] + ([nn.Dropout(0.3)] if dropout else []) + [nn.Linear(6, 1)]
    model = nn.Sequential(*layers).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randn(n, 1, dtype=torch.float64)
    xt = torch.randn(4, 3, dtype=torch.float64)
    yt = torch.randn(4, 1, dtype=torch.float64)
    return model, TensorDataset(x, y), TensorDataset(xt, yt)


def loop(**kw) -> FurtherTrainingLoop:
    base = dict(task=SupervisedTask(), lr=0.05, batch_size=5, epochs=3, seeds=2, progress=False)
    base.update(kw)
    if "steps" in kw and "epochs" not in kw:
        base["epochs"] = None
    return FurtherTrainingLoop(**base)


def engines_vs_oracle(model, train, test, tol: float, loo=LOO, **kw) -> GoldStandard:
    """Run the sequential oracle once and check both vectorised engines against it (the MLP kernel on
    its paths: ``torch.bmm``, the compiled step on one and on two threads)."""
    slow = loop(engine="sequential", **kw).run(model, train, test, loo)
    for engine, path in [("vectorised", None), ("mlp", "bmm"), ("mlp", "native"), ("mlp", "native-2")]:
        fast_loop = loop(engine=engine, **kw)
        with mlp_path(path):
            assert_same(fast_loop.run(model, train, test, loo), slow, tol)
            kernel = fast_loop.info["mlp_kernel"]
        assert fast_loop.info["engine"] == engine
        assert kernel is None if engine == "vectorised" else kernel.startswith("compiled" if native_runs(path) else "torch.bmm")
    return slow


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_same(fast: GoldStandard, slow: GoldStandard, tol: float) -> None:
    assert fast.loo.shape == slow.loo.shape
    assert rel(fast.loo, slow.loo) < tol
    for adjust in fast.adjustments:
        assert rel(fast.scores(adjust), slow.scores(adjust)) < tol
    if slow.full is not None:
        assert rel(fast.full, slow.full) < tol


OPTS = [
    dict(optimizer="sgd", lr=0.05),
    dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.1),
    dict(optimizer="adam", lr=0.01, weight_decay=0.1),
    dict(optimizer="adamw", lr=0.01, weight_decay=0.1),
]


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
@pytest.mark.parametrize("leave_out", ["subtract", "drop"])
@pytest.mark.parametrize("grad_clip", [None, 0.3])
def test_full_batch_matches_sequential(opt, leave_out, grad_clip):
    model, train, test = problem()
    slow = engines_vs_oracle(
        model,
        train,
        test,
        1e-6,
        batch_size=N,
        epochs=4,
        seeds=1,
        leave_out=leave_out,
        grad_clip=grad_clip,
        **opt,
    )
    # the scores are real differences, far above rounding
    assert slow.scores("full").abs().max() > 1e-6


@pytest.mark.parametrize("opt", OPTS[1:3], ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("leave_out", ["subtract", "drop"])
@pytest.mark.parametrize("length", [dict(epochs=3), dict(steps=11, eval_every=4)], ids=["epochs", "steps"])
def test_minibatch_matches_sequential(opt, leave_out, length):
    model, train, test = problem()
    slow = engines_vs_oracle(model, train, test, 1e-9, leave_out=leave_out, grad_clip=0.5, **opt, **length)
    assert slow.checkpoints == ([1, 2, 3] if "epochs" in length else [4, 8, 11])


@pytest.mark.parametrize("length", [dict(epochs=2), dict(steps=7, eval_every=2)], ids=["epochs", "steps"])
def test_drop_with_shorter_epochs_matches_sequential(length):
    """n - 1 = 22 is a multiple of b = 11: LOO runs take 2 steps per epoch, the full run 3."""
    model, train, test = problem()
    engines_vs_oracle(
        model, train, test, 1e-9, batch_size=11, leave_out="drop", optimizer="adam", lr=0.01, **length
    )


def test_float32_matches_sequential_to_float_tolerance():
    model, train, test = problem()
    model = model.float()
    train = TensorDataset(*(t.float() for t in train.tensors))
    test = TensorDataset(*(t.float() for t in test.tensors))
    slow = engines_vs_oracle(model, train, test, 1e-4)
    assert slow.loo.dtype == torch.float32


@pytest.mark.parametrize("leave_out", ["subtract", "drop"])
def test_classification_mlp_with_every_activation_matches_sequential(leave_out):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(4, 7),
        nn.ReLU(),
        nn.Linear(7, 7),
        nn.LeakyReLU(0.1),
        nn.Linear(7, 5),
        nn.Sigmoid(),
        nn.Dropout(0.5),
        nn.Identity(),
        nn.Linear(5, 3, bias=False),
    ).double()
    train = TensorDataset(torch.randn(N, 4, dtype=torch.float64), torch.randint(0, 3, (N,)))
    test = TensorDataset(torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,)))
    engines_vs_oracle(
        model,
        train,
        test,
        1e-9,
        task=SupervisedTask("cross_entropy"),
        optimizer="adamw",
        seeds=1,
        epochs=2,
        lr=0.02,
        weight_decay=0.01,
        leave_out=leave_out,
        grad_clip=1.0,
    )


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(3, 6), nn.Linear(6, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + torch.sin(h))


def test_engine_choice():
    model, train, test = problem()
    lp = loop()
    lp.run(model, train, test, LOO)
    assert lp.info["engine"] == "mlp"
    torch.manual_seed(0)
    other = Residual().double()
    lp.run(other, train, test, LOO)
    assert lp.info["engine"] == "vectorised"
    with pytest.raises(ValueError, match="'mlp' engine cannot run this model: the model is Residual"):
        loop(engine="mlp").run(other, train, test, LOO)
    slow = loop(engine="sequential").run(other, train, test, LOO)
    assert_same(loop().run(other, train, test, LOO), slow, 1e-9)


def _first_step(model, train, test, seed, j, leave_out, lr, b):
    """Independent oracle for one SGD step: the SPEC §2 loss written out by hand."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = train.tensors
    n = x.shape[0]
    perm = epoch_permutation(seed, 0, n)
    if leave_out == "drop" and j is not None:
        perm = perm[perm != j]
    batch = perm[:b]

    def loss(p):
        ell = (functional_call(model, p, (x,)) - y).pow(2).sum(1)
        value = ell[batch].mean()
        if leave_out == "subtract" and j is not None:
            value = value - ell[j] / n
        return value

    g = grad(loss)(params)
    new = {k: params[k] - lr * g[k] for k in params}
    xt, yt = test.tensors
    return (functional_call(model, new, (xt,)) - yt).pow(2).sum(1)


@pytest.mark.parametrize("leave_out", ["subtract", "drop"])
def test_one_step_follows_spec(leave_out):
    model, train, test = problem()
    gold = loop(lr=0.1, steps=1, eval_every=1, seeds=[3, 5], leave_out=leave_out).run(model, train, test, LOO)
    assert gold.checkpoints == [1] and gold.checkpoint_unit == "step"
    for s, seed in enumerate([3, 5]):
        full = _first_step(model, train, test, seed, None, leave_out, 0.1, 5)
        torch.testing.assert_close(gold.full[s, 0], full, rtol=1e-12, atol=1e-12)
        for c, j in enumerate(LOO):
            loo = _first_step(model, train, test, seed, j, leave_out, 0.1, 5)
            torch.testing.assert_close(gold.loo[s, 0, :, c], loo, rtol=1e-12, atol=1e-12)


def test_subtract_full_batch_equals_drop_with_rescaled_lr():
    """Full batch, SGD: subtract minimises (1/n) Σ_{i≠j} ℓ_i and drop (1/(n−1)) Σ_{i≠j} ℓ_i."""
    model, train, test = problem()
    sub = loop(batch_size=N, lr=0.05, leave_out="subtract", adjustments=("mean",), seeds=1).run(
        model, train, test, LOO
    )
    drop = loop(batch_size=N, lr=0.05 * (N - 1) / N, leave_out="drop", adjustments=("mean",), seeds=1).run(
        model, train, test, LOO
    )
    torch.testing.assert_close(sub.loo, drop.loo, rtol=1e-10, atol=1e-12)


def test_gold_standard_result_and_adjustments():
    model, train, test = problem()
    gold = loop(seeds=[4, 1]).run(model, train, test, LOO, test_indices=[2, 0])
    assert gold.loo.shape == (2, 3, 2, len(LOO)) and gold.full.shape == (2, 3, 2)
    assert gold.seeds == [4, 1] and gold.checkpoints == [1, 2, 3] and gold.checkpoint_unit == "epoch"
    assert gold.test_indices.tolist() == [2, 0] and gold.loo_indices.tolist() == LOO
    assert gold.config["further_training"]["leave_out"] == "subtract"
    # seeds change the sample order, hence the result
    assert not torch.allclose(gold.loo[0], gold.loo[1])
    # without 'full', the full run is skipped and the LOO measurements are unchanged
    mean_only = loop(seeds=[4, 1], adjustments=("mean",)).run(model, train, test, LOO, test_indices=[2, 0])
    assert mean_only.full is None and mean_only.adjustments == ("mean",)
    torch.testing.assert_close(mean_only.loo, gold.loo, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mean_only.scores("mean"), gold.scores("mean"), rtol=1e-12, atol=1e-14)


def test_chunking_does_not_change_results():
    model, train, test = problem()
    one = loop(chunk_size=2).run(model, train, test, LOO)
    many = loop().run(model, train, test, LOO)
    torch.testing.assert_close(one.loo, many.loo, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(one.full, many.full, rtol=1e-12, atol=1e-14)


def test_clipping_is_active():
    model, train, test = problem()
    clipped = loop(grad_clip=0.05).run(model, train, test, LOO)
    free = loop().run(model, train, test, LOO)
    assert rel(clipped.loo, free.loo) > 1e-3


def test_dropout_trains_in_eval_mode_by_default_and_falls_back_in_train_mode():
    model, train, test = problem(dropout=True)
    fast = loop().run(model, train, test, LOO)
    assert_same(fast, loop(engine="sequential").run(model, train, test, LOO), 1e-9)
    with pytest.warns(UserWarning, match="sequential"):
        lp = loop(train_mode=True)
        gold = lp.run(model, train, test, LOO)
    assert lp.info["engine"] == "sequential"
    assert not torch.allclose(gold.loo, fast.loo)  # dropout was on
    again = loop(train_mode=True, engine="sequential").run(model, train, test, LOO)
    assert torch.equal(again.loo, gold.loo)  # seeded dropout masks: reproducible
    with pytest.raises(ValueError, match="train_mode"):
        loop(train_mode=True, engine="vectorised").run(model, train, test, LOO)
    assert model.training  # the caller's mode flags are left alone


def test_estimate_counts_sample_gradients():
    model, train, test = problem()
    est = loop(seeds=3, chunk_size=2).estimate(model, train, test, LOO)
    steps = 3 * math.ceil(N / 5)
    assert est.runs == 3 * (len(LOO) + 1) and est.units == 3 * 3 and est.steps_per_run == steps
    assert est.sample_gradients == 3 * (len(LOO) * (3 * N + steps) + 3 * N)
    assert est.measurements == est.runs * 3 * 4
    drop = loop(seeds=1, leave_out="drop", steps=10, eval_every=5, adjustments=("mean",)).estimate(
        model, train, test, LOO
    )
    # LOO runs: 5 batches per epoch of 22 -> 2 epochs (44 rows)
    assert drop.sample_gradients == len(LOO) * 44 and drop.runs == len(LOO)
    assert "sample gradients" in str(drop)


def test_non_finite_loss_names_seed_and_run():
    model, train, test = problem()
    x, y = train.tensors
    y = y.clone()
    y[5] = 1e300  # finite data (checked before training) whose squared error overflows at step 1
    bad = TensorDataset(x, y)
    for engine in ("vectorised", "mlp", "sequential"):
        with pytest.raises(FloatingPointError, match=r"seed 0, step 1, in the full run"):
            loop(engine=engine, seeds=1, batch_size=N).run(model, bad, test, LOO)
        with pytest.raises(
            FloatingPointError, match=r"seed 0, step 1, in the run leaving out training index 0"
        ):
            loop(engine=engine, seeds=1, batch_size=N, adjustments=("mean",)).run(model, bad, test, LOO)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(lr=0.0), ValueError, "lr must be"),
        (dict(lr=-1.0), ValueError, "lr must be"),
        (dict(epochs=2, steps=3, eval_every=1), ValueError, "exactly one of epochs= or steps="),
        (dict(epochs=None), ValueError, "exactly one of epochs= or steps="),
        (dict(steps=4), ValueError, "eval_every='epoch' needs epochs="),
        (dict(eval_every=0), ValueError, "eval_every must be"),
        (dict(optimizer="rmsprop"), ValueError, "optimizer must be one of"),
        (dict(optimizer="adam", momentum=0.9), ValueError, "momentum applies"),
        (dict(leave_out="remove"), ValueError, "leave_out must be"),
        (dict(grad_clip=0.0), ValueError, "grad_clip"),
        (dict(adjustments=("median",)), ValueError, "adjustments"),
        (dict(seeds=0), ValueError, "seeds"),
        (dict(seeds=[1, 1]), ValueError, "duplicates"),
        (dict(engine="gpu"), ValueError, "engine must be"),
        (dict(batch_size=0), ValueError, "batch_size"),
    ],
)
def test_bad_configuration_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        loop(**kwargs)


def test_bad_run_arguments_are_refused():
    model, train, test = problem()
    with pytest.raises(IndexError, match="out of range"):
        loop().run(model, train, test, [0, N])
    with pytest.raises(IndexError, match="out of range"):
        loop().run(model, train, test, LOO, test_indices=[9])
    with pytest.raises(ValueError, match="duplicates"):
        loop().run(model, train, test, [1, 1])
    with pytest.raises(ValueError, match="multiple of batch_size"):
        loop(leave_out="drop", batch_size=11, eval_every=2).run(model, train, test, LOO)
    with pytest.raises(ValueError, match="No attribution task"):
        loop(task=None).run(model, train, test, LOO)


@pytest.mark.parametrize(
    "config",
    [
        dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
        dict(optimizer="adam", lr=0.01, weight_decay=0.1),
        dict(optimizer="adamw", lr=0.01, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6),
    ],
    ids=lambda c: c["optimizer"],
)
def test_functional_optimizer_matches_torch_optim(config):
    from lightning_fimoda.further_training import FurtherTrainingConfig
    from lightning_fimoda.further_training.optimizers import StackedOptimizer

    torch.manual_seed(0)
    opt = StackedOptimizer(FurtherTrainingConfig(epochs=1, **config))
    start = {"w": torch.randn(3, 4, 2, dtype=torch.float64), "b": torch.randn(3, 2, dtype=torch.float64)}
    grads = [{n: torch.randn_like(p) for n, p in start.items()} for _ in range(5)]
    assert_matches_torch_optim(opt, start, grads, sit_out=2, clip=1.5)


def test_lightning_mlp_uses_the_mlp_engine_and_matches_sequential():
    from lightning_fimoda.zoo.models import MLP

    _, train, test = problem()
    model = MLP(input_dim=train.tensors[0].shape[1], hidden=(5,), seed=0).double()
    lp = loop()
    fast = lp.run(model, train, test, LOO)
    assert lp.info["engine"] == "mlp"
    assert_same(fast, loop(engine="sequential").run(model, train, test, LOO), 1e-9)
