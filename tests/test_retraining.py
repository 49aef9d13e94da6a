"""RetrainingLoop: leave-one-out re-training from the initial weights, against a naive re-training loop
written here (one model, torch.optim.SGD, each run's own batches); resume, kind separation of run
directories, seeds, initial weights and validation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fimoda import FurtherTrainingLoop, RetrainingLoop, SupervisedTask
from lightning_fimoda.exceptions import ConfigurationError, MismatchError
from lightning_fimoda.further_training import RetrainingConfig, epoch_permutation
from lightning_fimoda.further_training.plan import TrainingPlan
from lightning_fimoda.further_training.retraining import reinitialise
from lightning_fimoda.further_training.verify import verify_run_dir
from lightning_fimoda.zoo.models import MLP

N, B, EPOCHS, LR = 23, 5, 3, 0.1
LOO = [0, 3, 22, 7, 11]


def problem():
    """(final model, initial weights, train, test): the final model is the initial one trained a bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    initial = copy.deepcopy(model.state_dict())
    train = TensorDataset(torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 1, dtype=torch.float64))
    test = TensorDataset(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))  # "trained": any other weights of the same architecture
    return model, initial, train, test


def loop(**kw) -> RetrainingLoop:
    base = dict(task=SupervisedTask(), lr=LR, batch_size=B, epochs=EPOCHS, seeds=2, progress=False)
    return RetrainingLoop(**{**base, **kw})


def naive_retraining(initial, train, test, seed: int, j: int | None, leave_out: str) -> torch.Tensor:
    """``f`` on the test set after every epoch of re-training from ``initial`` without ``z_j``: [E, n_test]."""
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    net.load_state_dict(initial)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    x, y = train.tensors
    out = []
    for epoch in range(EPOCHS):
        perm = epoch_permutation(seed, epoch, N)
        if leave_out == "drop" and j is not None:
            perm = perm[perm != j]
        for idx in perm.split(B):
            loss = ((net(x[idx]) - y[idx]) ** 2).sum(1).mean()
            if leave_out == "subtract" and j is not None:
                loss = loss - ((net(x[j : j + 1]) - y[j : j + 1]) ** 2).sum() / N
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out.append(((net(test.tensors[0]) - test.tensors[1]) ** 2).sum(1))
    return torch.stack(out)


@pytest.mark.parametrize("leave_out", ["drop", "subtract"])
@pytest.mark.parametrize("engine", ["mlp", "vectorised", "sequential"])
def test_equals_naive_retraining_loop(leave_out, engine):
    model, initial, train, test = problem()
    rl = loop(initial_weights=initial, leave_out=leave_out, engine=engine)
    gold = rl.run(model, train, test, LOO)
    assert rl.info["engine"] == engine
    assert gold.config["kind"] == "retraining" and gold.config["further_training"]["leave_out"] == leave_out
    for s, seed in enumerate(gold.seeds):
        want = torch.stack([naive_retraining(initial, train, test, seed, j, leave_out) for j in LOO], dim=-1)
        full = naive_retraining(initial, train, test, seed, None, leave_out)
        assert torch.allclose(gold.loo[s], want, rtol=0, atol=1e-6 * want.abs().max())
        assert torch.allclose(gold.full[s], full, rtol=0, atol=1e-6 * full.abs().max())
    # it is not further training: starting from the final weights gives other numbers
    further = FurtherTrainingLoop(SupervisedTask(), lr=LR, batch_size=B, epochs=EPOCHS, seeds=2, leave_out=leave_out,
                                  progress=False).run(model, train, test, LOO)
    assert (further.loo - gold.loo).abs().max() > 1e-2


def test_default_leave_out_is_drop_and_final_weights_only_give_the_architecture():
    model, initial, train, test = problem()
    assert RetrainingConfig(lr=LR, epochs=1).leave_out == "drop"
    cost = loop(initial_weights=initial).estimate(model, train, test, LOO)  # dry run, as further training's
    assert (cost.runs, cost.steps_per_run, cost.measurements) == (2 * 6, EPOCHS * 5, 2 * 6 * EPOCHS * 4)
    gold = loop(initial_weights=initial).run(model, train, test, LOO)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(3.0)
    start = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    start.load_state_dict(initial)
    assert loop(initial_weights=start).run(other, train, test, LOO).equals(gold)  # a module as initial weights


def test_init_seed_reinitialises_like_the_zoo_models_seed():
    final = MLP(input_dim=3, num_outputs=1, hidden=[5, 4], seed=7)
    with torch.no_grad():
        for p in final.parameters():
            p.add_(1.0)
    again = reinitialise(final, 7)
    fresh = MLP(input_dim=3, num_outputs=1, hidden=[5, 4], seed=7)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), fresh.state_dict().values()))
    assert not torch.equal(final.net[0].weight, fresh.net[0].weight)  # the argument is not changed
    doubled = reinitialise(copy.deepcopy(final).double(), 7)  # the draws do not depend on the dtype
    assert all(torch.equal(a, b.double()) for a, b in zip(doubled.state_dict().values(), fresh.state_dict().values()))
    assert doubled.net[0].weight.dtype == torch.float64
    train = TensorDataset(torch.randn(N, 3), torch.randn(N, 1))
    test = TensorDataset(torch.randn(4, 3), torch.randn(4, 1))
    by_seed = loop(init_seed=7, seeds=1).run(final, train, test, LOO)
    by_weights = loop(initial_weights=fresh.state_dict(), seeds=1).run(final, train, test, LOO)
    assert torch.equal(by_seed.loo, by_weights.loo)
    assert by_seed.config["further_training"]["init_seed"] == 7
    other = loop(init_seed=8, seeds=1).run(final, train, test, LOO)
    assert (other.loo - by_seed.loo).abs().max() > 1e-3


def test_seeds_differ():
    model, initial, train, test = problem()
    gold = loop(initial_weights=initial, seeds=[0, 5]).run(model, train, test, LOO)
    diff = (gold.differences("mean")[0] - gold.differences("mean")[1]).abs().max()
    assert diff > 1e-3 * gold.differences("mean").abs().max()
    assert (gold.full[0] - gold.full[1]).abs().max() > 1e-3
    alone = loop(initial_weights=initial, seeds=[5]).run(model, train, test, LOO)
    assert torch.equal(alone.loo[0], gold.loo[1])  # a seed's runs do not depend on the other seeds


def test_resumes_after_interruption(tmp_path, monkeypatch):
    model, initial, train, test = problem()
    reference = loop(initial_weights=initial, chunk_size=2).run(model, train, test, LOO)
    compute, calls = TrainingPlan.compute, []

    def dies_at_third_unit(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return compute(self, *args, **kwargs)

    monkeypatch.setattr(TrainingPlan, "compute", dies_at_third_unit)
    with pytest.raises(KeyboardInterrupt):
        loop(initial_weights=initial, chunk_size=2, run_dir=tmp_path).run(model, train, test, LOO)
    monkeypatch.setattr(TrainingPlan, "compute", compute)
    half = verify_run_dir(tmp_path)  # `fimoda verify` reads a re-training run_dir as well
    assert half.ok and half.units_ok == 2 and len(half.to_recompute) == 4
    resumed = loop(initial_weights=initial, chunk_size=2, run_dir=tmp_path)
    gold = resumed.run(model, train, test, LOO)
    assert resumed.info["units_loaded"] == 2 and resumed.info["units_computed"] == 4
    assert gold.equals(reference)
    assert torch.equal(gold.loo, reference.loo) and gold.config["kind"] == "retraining"
    assert verify_run_dir(tmp_path).units_ok == 6


def test_run_directories_never_mix_the_two_kinds(tmp_path):
    model, initial, train, test = problem()
    further = FurtherTrainingLoop(SupervisedTask(), lr=LR, batch_size=B, epochs=1, seeds=1, leave_out="drop",
                                  run_dir=tmp_path / "ft", progress=False)
    further.run(model, train, test, LOO)
    with pytest.raises(MismatchError, match="holds a further-training job, not a retraining one"):
        loop(initial_weights=model.state_dict(), epochs=1, seeds=1, run_dir=tmp_path / "ft").run(model, train, test, LOO)
    loop(initial_weights=initial, epochs=1, seeds=1, run_dir=tmp_path / "rt").run(model, train, test, LOO)
    with pytest.raises(MismatchError, match="holds a retraining job, not a further-training one"):
        further.run_dir = tmp_path / "rt"
        further.run(model, train, test, LOO)
    # with run_root the two kinds of the same model get different directories
    for kind in (further, loop(initial_weights=model.state_dict(), epochs=1, seeds=1)):
        kind.run_dir, kind.run_root = None, tmp_path / "root"
        kind.run(model, train, test, LOO)
    assert len(list((tmp_path / "root").iterdir())) == 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(), ConfigurationError, "exactly one of initial_weights"),
        (dict(init_seed=0, initial_weights={}), ConfigurationError, "exactly one of initial_weights"),
        (dict(init_seed=-1), ConfigurationError, "init_seed must be"),
        (dict(init_seed=True), ConfigurationError, "init_seed must be"),
        (dict(initial_weights=[1.0]), TypeError, "state dict or an nn.Module"),
        (dict(init_seed=0, config=RetrainingConfig(lr=0.1, epochs=1)), ConfigurationError, "not both"),
        (dict(init_seed=0, lr=0.1, epochs=1, bogus=1), TypeError, "unknown settings"),
    ],
)
def test_bad_configuration_is_refused(kwargs, error, match):
    base = dict(lr=0.1, epochs=1) if "config" not in kwargs else {}
    with pytest.raises(error, match=match):
        RetrainingLoop(SupervisedTask(), **{**base, **kwargs})


def test_bad_initial_weights_are_refused_before_any_work(monkeypatch):
    model, initial, train, test = problem()
    monkeypatch.setattr(TrainingPlan, "compute", lambda *a, **k: pytest.fail("trained before validating"))
    with pytest.raises(MismatchError, match="do not fit the model's architecture"):
        loop(initial_weights={k: v for k, v in initial.items() if k != "2.bias"}).run(model, train, test, LOO)
    with pytest.raises(MismatchError, match="do not fit"):
        loop(initial_weights=nn.Linear(3, 6).double()).run(model, train, test, LOO)
    custom = nn.Sequential(nn.Linear(3, 1))
    custom.scale = nn.Parameter(torch.ones(1))
    with pytest.raises(ConfigurationError, match="without reset_parameters"):
        loop(init_seed=0).run(custom, train, test, LOO)
    config = RetrainingConfig(lr=0.1, epochs=1, init_seed=3)
    assert config.replace(lr=0.2) == RetrainingConfig(lr=0.2, epochs=1, init_seed=3)
    assert "RetrainingLoop(" in repr(RetrainingLoop(SupervisedTask(), config=config))
