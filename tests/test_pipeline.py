"""The pipeline behind attribute() and FiMODACallback (issues 11, 12.3, 12.6-12.8, 15.4): validation in
setup(), nothing finished lost, reruns reuse, output folders, progress and quiet attribution."""

from __future__ import annotations

import inspect
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch

from lightning_fimoda import attribute
from lightning_fimoda.attribute import run_estimators
from lightning_fimoda.callback import FiMODACallback
from lightning_fimoda.evaluation.report import AttributionReport
from lightning_fimoda.exceptions import ConfigurationError

from . import estimator_stubs
from .lightning_helpers import TinyDataModule, TinyRegressor, quiet_trainer, regression_data

GOLD = dict(optimizer="sgd", lr=0.02, epochs=2, batch_size=8, seeds=2, progress=False)


class Spy(TinyRegressor):
    """Counts training steps: validation must fail before the first one."""

    steps = 0

    def training_step(self, batch, batch_idx):
        Spy.steps += 1
        return super().training_step(batch, batch_idx)


def fit(callback: FiMODACallback, model=None) -> FiMODACallback:
    quiet_trainer(callbacks=[callback]).fit(model or TinyRegressor(), datamodule=TinyDataModule())
    return callback


def callback(tmp_path, estimators, **kwargs) -> FiMODACallback:
    defaults = dict(num_train=6, num_test=3, output_dir=str(tmp_path), print_summary=False, log=False, plots=False)
    return FiMODACallback(estimators, **{**defaults, **kwargs})


# -- 12.2 / 11: everything is validated in setup(), before training --------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(estimators=["grad_dot", "test_refusing"]), "this model is not supported"),
        (dict(estimators=["grad_dot"], mislabeled=[3, 30]), r"indices \[30\] are out of range; valid .* 0\.\.29"),
        (dict(estimators=["grad_dot"], test_indices=[0, 8], num_test=None), "out of range"),
    ],
)
def test_setup_validates_before_training(tmp_path, kwargs, match):
    estimators = kwargs.pop("estimators")
    Spy.steps = 0
    with pytest.raises((ConfigurationError, IndexError), match=match):
        fit(callback(tmp_path, estimators, **kwargs), Spy())
    assert Spy.steps == 0


def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    Spy.steps = 0
    with pytest.raises(ConfigurationError, match="cannot be written.*is not a folder"):
        fit(callback(tmp_path, ["grad_dot"], output_dir=str(blocker / "fimoda")), Spy())
    assert Spy.steps == 0


def test_one_default_for_share_gradients_and_progress():
    defaults = {
        fn.__name__: {p: inspect.signature(fn).parameters[p].default for p in ("share_gradients", "progress")}
        for fn in (run_estimators, FiMODACallback.__init__)
    }
    assert defaults["run_estimators"] == defaults["__init__"] == {"share_gradients": True, "progress": None}


# -- 12.3: nothing finished is lost --------------------------------------------------------------------
def test_failing_estimator_is_reported_and_the_rest_kept(tmp_path, capsys):
    cb = fit(callback(tmp_path, ["grad_dot", "test_failing"], gold=GOLD, print_summary=True))
    report = cb.report
    assert report.labels == ["grad_dot"] and report.failed == {"test_failing": "RuntimeError: boom in fit"}
    out = capsys.readouterr().out
    assert "estimator 'test_failing' failed (RuntimeError: boom in fit)" in out
    assert "FAILED test_failing: RuntimeError: boom in fit" in out
    loaded = AttributionReport.load(tmp_path)
    assert loaded.equals(report) and loaded.gold is not None and loaded.failed == report.failed
    md = (tmp_path / "report.md").read_text()
    assert "## Failed estimators" in md and "boom in fit" in md
    assert (tmp_path / "estimators" / "grad_dot.safetensors").is_file()
    assert list((tmp_path / "gold").glob("*/units/*.safetensors"))  # the gold standard's default run_dir
    run_dir = Path(report.info["gold_standard_run_dir"])  # the report names the directory actually used
    assert run_dir.parent == tmp_path / "gold" and (run_dir / "config.json").is_file()


def test_rerun_reuses_saved_scores_and_gold_units(tmp_path):
    model = TinyRegressor()
    dm = TinyDataModule()
    dm.setup()
    first = callback(tmp_path, ["test_counting", "grad_dot"], gold=GOLD)
    estimator_stubs.Counting.fits = 0
    report = first.attribute(None, model, datamodule=dm)
    assert estimator_stubs.Counting.fits == 1 and report.info["gold_standard_run"]["units_computed"] >= 1
    again = callback(tmp_path, ["test_counting", "grad_dot"], gold=GOLD).attribute(None, model, datamodule=dm)
    assert estimator_stubs.Counting.fits == 1  # reused: same settings, weights and indices
    assert all(r.reused for r in again.runs) and again.info["gold_standard_run"]["units_computed"] == 0
    assert torch.equal(again.scores["test_counting"], report.scores["test_counting"])
    changed = callback(tmp_path, [{"name": "test_counting", "scale": 2.0}]).attribute(None, model, datamodule=dm)
    assert estimator_stubs.Counting.fits == 2  # other settings: recomputed
    assert torch.allclose(changed.scores["test_counting"], 2 * report.scores["test_counting"], rtol=1e-12, atol=0)
    with torch.no_grad():
        model.net[0].bias.add_(0.1)
    callback(tmp_path, ["test_counting"]).attribute(None, model, datamodule=dm)
    assert estimator_stubs.Counting.fits == 3  # other weights: recomputed
    model.net[0].bias.requires_grad_(False)
    frozen = callback(tmp_path, ["test_counting"]).attribute(None, model, datamodule=dm)
    assert estimator_stubs.Counting.fits == 4 and not frozen.runs[0].reused  # other trainable parameters


def test_rerun_recomputes_when_the_data_changes_with_the_same_sizes(tmp_path):
    """Saved scores are keyed on the data's contents, not only its size (a relabelled training set)."""
    model, dm = TinyRegressor(), TinyDataModule()
    dm.setup()
    estimator_stubs.Counting.fits = 0
    callback(tmp_path, ["test_counting"]).attribute(None, model, datamodule=dm)
    x, y = dm.train_dataset.tensors
    dm.train_dataset = torch.utils.data.TensorDataset(x, y + 1.0)  # same length, other labels
    again = callback(tmp_path, ["test_counting"]).attribute(None, model, datamodule=dm)
    assert estimator_stubs.Counting.fits == 2 and not again.runs[0].reused


def test_our_own_errors_are_one_line_and_unexpected_ones_keep_their_traceback(monkeypatch, capsys):
    from lightning_fimoda.estimators.first_order import GradDot

    def refuse(self):
        raise ConfigurationError("grad_dot: a clear refusal")

    monkeypatch.setattr(GradDot, "_fit", refuse)
    model, dm = TinyRegressor(), TinyDataModule()
    dm.setup()
    runs = run_estimators(model, model.attribution_task(), dm.train_dataset, dm.test_dataset,
                          ["grad_dot", "test_failing"], keep_going=True)
    assert [r.ok for r in runs] == [False, False]
    err = capsys.readouterr().err
    assert "boom in fit" in err and err.count("Traceback") == 1 and "a clear refusal" not in err


# -- 12.6: output folders ------------------------------------------------------------------------------
def test_second_run_replaces_the_first_reports_files_with_normal_permissions(tmp_path, capsys):
    old_umask = os.umask(0o022)
    try:
        fit(callback(tmp_path, ["grad_dot"], gold=GOLD, plots=True))
        assert (tmp_path / "agreement_mean_cosine.png").is_file()
        for name in ("report.md", "report.json", "scores.safetensors", "gold_standard.safetensors"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
        capsys.readouterr()
        fit(callback(tmp_path, ["grad_cos"], plots=False, print_summary=False))
    finally:
        os.umask(old_umask)
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "gold_standard.safetensors").exists()
    assert "replaced the previous report" in capsys.readouterr().out
    assert AttributionReport.load(tmp_path).labels == ["grad_cos"]


# -- 12.7: errors list what is valid ----------------------------------------------------------------------
def test_top_k_of_an_unknown_label_lists_the_valid_ones(tmp_path):
    model, dm = TinyRegressor(), TinyDataModule()
    dm.setup()
    report = callback(tmp_path, ["grad_dot", "test_failing"]).attribute(None, model, datamodule=dm)
    with pytest.raises(ConfigurationError, match=r"'unknown'. Valid labels: \['grad_dot'\]"):
        report.top_k("unknown")
    with pytest.raises(ConfigurationError, match="test_failing' failed: RuntimeError"):
        report.top_k("test_failing")


# -- 12.8: feedback and quiet ---------------------------------------------------------------------------
def test_progress_lines_with_eta_when_not_a_terminal(capsys):
    train, test = regression_data(10, 1), regression_data(3, 2)
    run_estimators(TinyRegressor(), TinyRegressor().attribution_task(), train, test, ["grad_dot", "grad_cos"])
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("fimoda: estimator 1/2 grad_dot done in") and "ETA" in err[0]
    assert err[1].startswith("fimoda: estimator 2/2 grad_cos done in") and "ETA" not in err[1]
    run_estimators(TinyRegressor(), TinyRegressor().attribution_task(), train, test, ["grad_dot"], progress=False)
    assert capsys.readouterr().err == ""


def test_third_party_future_warnings_are_silenced_during_attribution(tmp_path):
    model, dm = TinyRegressor(), TinyDataModule()
    dm.setup()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback(tmp_path, ["test_noisy"]).attribute(None, model, datamodule=dm)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    with pytest.warns(FutureWarning, match="old API"):  # outside attribution it is not hidden
        attribute(model, model.attribution_task(), dm.train_dataset, dm.test_dataset, "test_noisy", progress=False)


# -- 15.4: checkpoint-indexed (horizon-matched) estimators ----------------------------------------------------
def test_checkpoint_indexed_estimator_is_compared_checkpoint_by_checkpoint(tmp_path):
    gold = {k: v for k, v in GOLD.items() if k != "progress"}
    cb = fit(callback(tmp_path, ["grad_dot", {"name": "test_gold_copy", "gold": gold, "label": "copy"}],
                      gold=GOLD, plots=True, log=True))
    report = cb.report
    assert report.horizon_matched == ["copy"] and report.scores["copy"].shape == (2, 3, 6)
    curve = report.agreement("copy", "mean")
    assert torch.allclose(curve.mean, torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(report.agreement("grad_dot", "mean").mean, torch.ones(2, dtype=torch.float64))
    # the same scores compared with every checkpoint (the non-indexed way) would not agree perfectly
    from lightning_fimoda.evaluation.metrics import agreement

    flat = agreement(report.scores["copy"][0], report.gold.scores("mean"))
    assert float(flat.mean[1]) < 1 - 1e-6
    md = (tmp_path / "report.md").read_text()
    assert "horizon-matched (checkpoint-indexed) estimators: copy" in md
    assert (tmp_path / "agreement_mean_cosine.png").is_file()
    assert AttributionReport.load(tmp_path).equals(report)
    assert report.seed_averaging("copy")[2].mean.shape == (2,)
