"""FiMODACallback end to end: Trainer.fit → estimators + gold standard → report; state left as found."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader

from lightning_fimoda import attribute
from lightning_fimoda.callback import FiMODACallback
from lightning_fimoda.evaluation.metrics import rowwise_agreement
from lightning_fimoda.evaluation.report import AttributionReport
from lightning_fimoda.further_training import FurtherTrainingLoop

from .lightning_helpers import TinyDataModule, TinyRegressor, quiet_trainer, regression_data

GOLD = dict(optimizer="sgd", lr=0.02, epochs=2, batch_size=8, seeds=4, progress=False)


def py_cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def rng_snapshot() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def same_rng(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One fit with the callback (two estimators, a tiny gold standard), shared by the tests below."""
    out = tmp_path_factory.mktemp("fimoda")
    seed_everything(0)
    callback = FiMODACallback(
        ["grad_dot", {"name": "grad_cos", "label": "cos"}],
        gold=GOLD,
        num_train=8,
        num_test=5,
        seed=3,
        output_dir=str(out),
        print_summary=False,
    )
    model, dm = TinyRegressor(), TinyDataModule()
    trainer = quiet_trainer(callbacks=[callback])
    trainer.fit(model, datamodule=dm)
    return callback, model, dm, trainer, rng_snapshot()


def test_report_agreement_equals_direct_computation(fitted):
    callback, model, dm, _, _ = fitted
    report = callback.report
    assert isinstance(report, AttributionReport) and report.labels == ["grad_dot", "cos"]
    # the seeded random choice of instances
    gen = torch.Generator().manual_seed(3)
    train_idx = torch.randperm(30, generator=gen)[:8].sort().values
    test_idx = torch.randperm(8, generator=gen)[:5].sort().values
    assert torch.equal(report.train_indices, train_idx) and torch.equal(report.test_indices, test_idx)
    # scores equal attribute() on the fitted model
    direct = attribute(model, model.attribution_task(), dm.train_dataset, dm.test_dataset,
                       ["grad_dot", "grad_cos"], train_idx, test_idx)
    assert torch.allclose(report.scores["grad_dot"], direct["grad_dot"], rtol=1e-10, atol=0)
    assert torch.allclose(report.scores["cos"], direct["grad_cos"], rtol=1e-10, atol=0)
    # gold standard equals the loop run directly
    gold = FurtherTrainingLoop(model.attribution_task(), **GOLD).run(
        model, dm.train_dataset, dm.test_dataset, train_idx, test_idx
    )
    assert torch.allclose(report.gold.loo, gold.loo, rtol=1e-10, atol=0)
    assert report.gold.checkpoints == [1, 2] and report.gold.checkpoint_unit == "epoch"
    # agreement: per-test cosine, mean and standard error, by hand
    for label in report.labels:
        for adjust in ("mean", "full"):
            g = report.gold.scores(adjust)
            curve = report.agreement(label, adjust, "cosine")
            for c in range(len(report.gold.checkpoints)):
                rows = [py_cosine(report.scores[label][t].tolist(), g[c, t].tolist()) for t in range(5)]
                mean = sum(rows) / 5
                sem = math.sqrt(sum((r - mean) ** 2 for r in rows) / 4) / math.sqrt(5)
                assert float(curve.mean[c]) == pytest.approx(mean, abs=1e-12)
                assert float(curve.sem[c]) == pytest.approx(sem, abs=1e-12)
    # Grad-Dot tracks short SGD further training closely (first-order Taylor expansion, SPEC §3), except
    # for a test instance whose loss is near zero (then the second-order term dominates)
    rows = rowwise_agreement(report.aligned_scores("grad_dot"), report.gold.scores("full")[0])
    assert (rows > 0.99).sum() >= 4


def test_outputs_written_and_reloadable(fitted):
    callback, *_ = fitted
    out = callback.report_dir
    for name in ("report.json", "report.md", "scores.safetensors", "gold_standard.safetensors",
                 "agreement_mean_cosine.png", "seed_averaging_full.png", "sorted_scores.png"):
        assert (out / name).is_file(), name
    assert AttributionReport.load(out).equals(callback.report)
    info = callback.report.info
    assert info["model"] == "TinyRegressor" and info["train_dataset_size"] == 30 and info["trained_epochs"] == 2
    assert info["gold_standard_run"]["units_computed"] >= 1
    settings = callback.report.settings["cos"]
    assert settings["estimator"] == "grad_cos" and settings["label"] == "cos"


def test_fit_with_callback_leaves_model_and_rng_as_without(fitted):
    _, model, _, _, rng_after = fitted
    seed_everything(0)
    plain = TinyRegressor()
    quiet_trainer().fit(plain, datamodule=TinyDataModule())
    assert same_rng(rng_snapshot(), rng_after)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name
    assert model.training == plain.training


def test_attribute_on_demand_restores_everything(fitted):
    callback, model, dm, trainer, _ = fitted
    model.train()
    model.net[2].eval()  # mixed modes
    model.net[0].bias.requires_grad_(False)
    model.net[0].bias.grad = None
    model.net[3].weight.grad = torch.full_like(model.net[3].weight, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    rng = rng_snapshot()
    report = callback.attribute(trainer, model, datamodule=dm)
    assert same_rng(rng_snapshot(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model.net[3].weight.grad, torch.full_like(model.net[3].weight, 0.5))
    assert model.net[0].bias.grad is None
    # frozen bias: attribution over the trainable parameters only, still a valid report
    assert report.scores["grad_dot"].shape == (5, 8)


def test_datasets_from_the_trainers_dataloaders(tmp_path):
    train, val = regression_data(20, seed=1), regression_data(6, seed=2)
    callback = FiMODACallback(["grad_dot"], num_train=5, output_dir=str(tmp_path), print_summary=False, plots=False)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(
        TinyRegressor(), train_dataloaders=DataLoader(train, batch_size=5), val_dataloaders=DataLoader(val)
    )
    report = callback.report
    assert report.info["train_dataset_size"] == 20 and report.info["test_dataset_size"] == 6
    assert report.scores["grad_dot"].shape == (6, 5) and report.gold is None
    assert not list(tmp_path.glob("*.png"))


def test_explicit_datasets_and_indices(tmp_path):
    train, test = regression_data(12, seed=4), regression_data(3, seed=5)
    callback = FiMODACallback(
        "grad_dot", train_indices=[0, 5, 7], test_indices=[2], train_dataset=train, test_dataset=test,
        output_dir=str(tmp_path), print_summary=False, log=False, plots=False, mislabeled=[5, 11],
    )
    model = TinyRegressor()
    report = callback.attribute(None, model)
    assert report.train_indices.tolist() == [0, 5, 7] and report.test_indices.tolist() == [2]
    direct = attribute(model, model.attribution_task(), train, test, "grad_dot", [0, 5, 7], [2])
    assert torch.allclose(report.scores["grad_dot"], direct["grad_dot"], rtol=1e-12, atol=0)
    assert report.mislabeled.tolist() == [False, True, False]
    s = -direct["grad_dot"].sum(0)
    assert report.mislabel_auc("grad_dot") == ((s[1] > s[0]).double() + (s[1] > s[2]).double()).item() / 2
    callback.mislabeled = [11]
    with pytest.raises(ValueError, match="0 of the 3 scored training instances are flagged"):
        callback.attribute(None, model)


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="train_indices or num_train, not both"):
        FiMODACallback(train_indices=[1], num_train=1)
    with pytest.raises(ValueError, match="needs a 'name' key"):
        FiMODACallback([{"damping": 1.0}])
    with pytest.raises(KeyError, match="Unknown estimator 'nope'"):
        FiMODACallback(["nope"])
    with pytest.raises(ValueError, match="Duplicate estimator labels"):
        FiMODACallback(["grad_dot", {"name": "grad_dot"}])
    with pytest.raises(ValueError, match="leave out 'task'"):
        FiMODACallback(gold={"task": None, "lr": 0.1})
    with pytest.raises(TypeError, match="gold must be None"):
        FiMODACallback(gold=3)
    with pytest.raises(TypeError, match="learning_rate"):  # FurtherTrainingLoop's own check, before training
        FiMODACallback(gold={"learning_rate": 0.1, "epochs": 1})
    callback = FiMODACallback(num_train=100, train_dataset=regression_data(10, 1), test_dataset=regression_data(2, 2))
    with pytest.raises(ValueError, match="Asked for 100 training instances but the training dataset has 10"):
        callback.attribute(None, TinyRegressor())
    with pytest.raises(ValueError, match="could not find the train_dataset and test_dataset"):
        FiMODACallback().attribute(None, TinyRegressor())


def test_skipped_under_fast_dev_run(tmp_path):
    callback = FiMODACallback(["grad_dot"], output_dir=str(tmp_path))
    quiet_trainer(fast_dev_run=True, callbacks=[callback]).fit(TinyRegressor(), datamodule=TinyDataModule())
    assert callback.report is None and not list(tmp_path.iterdir())
