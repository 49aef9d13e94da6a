"""FurtherTrainingConfig and FurtherTrainingLoop.check: settings validated when built, inputs checked
before any work (issue 11, issue 12.2/12.7, issue 13.4/13.5)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fimoda import SupervisedTask
from lightning_fimoda.exceptions import ConfigurationError, NonFiniteError, PrecisionError
from lightning_fimoda.further_training import FurtherTrainingConfig, FurtherTrainingLoop

N = 12
LOO = [0, 3, 7]


def problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(dtype)
    train = TensorDataset(torch.randn(N, 3, dtype=dtype), torch.randn(N, 1, dtype=dtype))
    test = TensorDataset(torch.randn(4, 3, dtype=dtype), torch.randn(4, 1, dtype=dtype))
    return model, train, test


def loop(**kw) -> FurtherTrainingLoop:
    base = dict(lr=0.05, batch_size=4, epochs=2, seeds=1, progress=False)
    return FurtherTrainingLoop(SupervisedTask(), **{**base, **kw})


class Counting(SupervisedTask):
    """Counts per_example_loss calls, so a test can tell that no training happened."""

    calls = 0

    def per_example_loss(self, model, batch):
        type(self).calls += 1
        return super().per_example_loss(model, batch)


# -- the config ------------------------------------------------------------------------------------
def test_config_schedule_and_checkpoint_steps():
    cfg = FurtherTrainingConfig(lr=0.1, epochs=3, batch_size=5)
    assert cfg.checkpoints(23) == [1, 2, 3]
    assert cfg.checkpoint_steps(23) == [5, 10, 15]  # ceil(23 / 5) = 5 steps per epoch
    steps = FurtherTrainingConfig(lr=0.1, steps=11, eval_every=4, batch_size=5)
    assert steps.checkpoints(23) == steps.checkpoint_steps(23) == [4, 8, 11]
    assert cfg.seeds == (0,) and cfg.adjustments == ("mean", "full")
    with pytest.raises(AttributeError):
        cfg.lr = 1.0  # frozen
    d = cfg.to_dict()
    assert d["optimizer"] == {"name": "sgd", "lr": 0.1, "weight_decay": 0.0, "momentum": 0.0,
                              "betas": [0.9, 0.999], "eps": 1e-8}
    assert (d["epochs"], d["batch_size"], d["seeds"]) == (3, 5, [0])
    assert cfg.replace(lr=0.2).lr == 0.2 and cfg.lr == 0.1
    with pytest.raises(ConfigurationError, match="lr must be"):
        cfg.replace(lr=float("nan"))
    with pytest.raises(ConfigurationError, match="multiple of batch_size"):
        FurtherTrainingConfig(lr=0.1, epochs=1, batch_size=11, leave_out="drop", eval_every=2).schedule(23)


def test_loop_from_config_equals_keyword_form():
    model, train, test = problem()
    cfg = FurtherTrainingConfig(lr=0.05, batch_size=4, epochs=2, seeds=2, optimizer="adam")
    a = FurtherTrainingLoop(SupervisedTask(), config=cfg, progress=False)
    b = loop(seeds=2, optimizer="adam")
    assert a.config == b.config and a.settings() == b.settings() == cfg.to_dict()
    assert a.run(model, train, test, LOO).equals(b.run(model, train, test, LOO))
    with pytest.raises(ConfigurationError, match="not both"):
        FurtherTrainingLoop(SupervisedTask(), config=cfg, lr=0.1)
    with pytest.raises(TypeError, match="learning_rate"):
        FurtherTrainingLoop(SupervisedTask(), learning_rate=0.1, epochs=1)


# -- check(): before any work ------------------------------------------------------------------------
def test_mean_reduced_loss_is_refused_before_training():
    class MeanLoss(Counting):
        def per_example_loss(self, model, batch):
            return super().per_example_loss(model, batch).mean()

    model, train, test = problem()
    lp = FurtherTrainingLoop(MeanLoss(), lr=0.05, epochs=2, batch_size=4, progress=False)
    with pytest.raises(ConfigurationError, match=r"use reduction='none'"):
        lp.check(model, train, test, LOO)
    MeanLoss.calls = 0
    with pytest.raises(ConfigurationError, match=r"per_example_loss returned \(\) for a batch of 2"):
        lp.run(model, train, test, LOO)
    assert MeanLoss.calls == 1  # the one probe call: nothing was trained


def test_non_finite_training_data_is_named_before_training():
    model, train, test = problem()
    x, y = train.tensors
    x = x.clone()
    x[4, 1] = math.nan
    with pytest.raises(NonFiniteError, match=r"training data is not finite: items \[4\]"):
        loop().run(model, TensorDataset(x, y), test, LOO)
    # a custom (non-tensor) dataset goes through its items
    items = [(x[i], y[i]) for i in range(N)]
    with pytest.raises(NonFiniteError, match=r"training data is not finite: items \[4\]"):
        loop().run(model, items, test, LOO)


def test_non_finite_measured_test_input_is_named_before_training():
    model, train, test = problem()
    xt, yt = test.tensors
    xt = xt.clone()
    xt[2, 0] = math.inf
    bad = TensorDataset(xt, yt)
    with pytest.raises(NonFiniteError, match=r"test data is not finite: items \[2\]"):
        loop().run(model, train, bad, LOO)
    loop().run(model, train, bad, LOO, test_indices=[0, 1, 3])  # item 2 is not measured: fine


def test_non_finite_weights_are_named():
    model, train, test = problem()
    with torch.no_grad():
        model[2].bias.fill_(math.nan)
    with pytest.raises(NonFiniteError, match=r"weights are not finite \(NaN/inf in \['2.bias'\]\)"):
        loop().run(model, train, test, LOO)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused(dtype):
    model, train, test = problem()
    model = model.to(dtype)
    with pytest.raises(PrecisionError, match=r"below half precision's resolution.*model.float\(\)"):
        loop().run(model, train, test, LOO)


def test_meta_device_is_refused():
    _, train, test = problem()
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    with pytest.raises(PrecisionError, match="meta device"):
        loop().check(model, train, test, LOO)


def test_invalid_indices_are_refused_by_check():
    model, train, test = problem()
    with pytest.raises(IndexError, match="out of range"):
        loop().check(model, train, test, [0, N])
    with pytest.raises(IndexError, match="out of range"):
        loop().check(model, train, test, LOO, test_indices=[4])
    task, loo, tests = loop().check(model, train, test, LOO, test_indices=[3, 1])
    assert isinstance(task, SupervisedTask) and loo.tolist() == LOO and tests.tolist() == [3, 1]


class NaNAfterTraining(SupervisedTask):
    """A measurement that turns NaN on test items with x[0] > 10 once the weights moved."""

    def __init__(self, start: torch.Tensor) -> None:
        super().__init__()
        self.start = start

    def measurement(self, model, batch):
        x, _ = self.unpack(batch)
        moved = (model[0].bias - self.start).abs().sum() > 0
        value = self.per_example_loss(model, batch)
        return torch.where(moved & (x[:, 0] > 10), torch.full_like(value, math.nan), value)


@pytest.mark.parametrize("engine", ["vectorised", "sequential"])
def test_non_finite_measurement_stops_at_the_first_checkpoint(tmp_path, engine):
    model, train, test = problem()
    xt, yt = test.tensors
    xt = xt.clone()
    xt[2, 0] = 20.0
    task = NaNAfterTraining(model[0].bias.detach().clone())
    lp = FurtherTrainingLoop(task, lr=0.05, epochs=2, batch_size=4, seeds=[3], engine=engine,
                             run_dir=tmp_path / "run", progress=False)
    with pytest.raises(NonFiniteError, match=r"test indices \[2\] at seed 3, step 3, in the full run"):
        lp.run(model, train, TensorDataset(xt, yt), LOO)
    assert not list((tmp_path / "run" / "units").glob("*.safetensors"))  # nothing stored


def test_memory_budget_defaults_to_a_share_of_available_memory_and_bad_values_are_refused():
    model, train, test = problem()
    with pytest.raises(ConfigurationError, match="memory_budget"):
        loop(memory_budget=0)
    default = loop().plan(model, train, test, LOO)
    small = loop(memory_budget=1).plan(model, train, test, LOO)
    assert small.chunk_size == 1 < default.chunk_size  # the default budget fits several runs per unit


def test_further_training_runs_without_tf32_and_restores_the_flags(monkeypatch):
    """TF32 (~1e-3 relative) would swamp leave-one-out effects (~1/n) on GPUs: off while training."""
    from lightning_fimoda.further_training import plan as plan_module

    seen = []
    original = plan_module.TrainingPlan.compute

    def spy(self, *args, **kwargs):
        seen.append((torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(plan_module.TrainingPlan, "compute", spy)
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        model, train, test = problem()
        loop().run(model, train, test, LOO)
        assert seen and all(flags == (False, "highest") for flags in seen)
        assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
