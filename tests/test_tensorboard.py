"""Logging: TensorBoard event files read back; CSVLogger scalars; a failing logger does not crash."""

from __future__ import annotations

import csv

import pytest
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import (
    HISTOGRAMS,
    IMAGES,
    SCALARS,
    TENSORS,
    EventAccumulator,
)

from lightning_fimoda.callback import FiMODACallback

from .lightning_helpers import TinyDataModule, TinyRegressor, quiet_trainer

GOLD = dict(lr=0.02, epochs=3, batch_size=10, seeds=2, progress=False)


def fit_with(logger, tmp_path, **kwargs) -> FiMODACallback:
    seed_everything(0)
    callback = FiMODACallback(
        ["grad_dot", "grad_cos"], gold=GOLD, num_train=6, num_test=4, print_summary=False, **kwargs
    )
    trainer = quiet_trainer(callbacks=[callback], logger=logger, default_root_dir=str(tmp_path), log_every_n_steps=1)
    trainer.fit(TinyRegressor(), datamodule=TinyDataModule())
    return callback


def test_tensorboard_event_files_hold_scalars_histograms_images_and_text(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callback = fit_with(logger, tmp_path)
    report = callback.report
    assert callback.report_dir == tmp_path / "tb" / "version_0" / "fimoda"  # default output_dir
    acc = EventAccumulator(logger.log_dir, size_guidance={SCALARS: 0, HISTOGRAMS: 0, IMAGES: 0, TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    # agreement curves: one point per further-training checkpoint, the report's values
    for label in ("grad_dot", "grad_cos"):
        for adjust in ("mean", "full"):
            for method in ("cosine", "spearman"):
                events = acc.Scalars(f"fimoda/agreement/{adjust}/{method}/{label}")
                assert [e.step for e in events] == [1, 2, 3]
                want = report.agreement(label, adjust, method).mean.tolist()
                assert [e.value for e in events] == pytest.approx(want, abs=1e-6)
        assert f"fimoda/seconds/{label}" in tags["scalars"]
        assert f"fimoda/peak_cosine/mean/{label}" in tags["scalars"]
        assert f"fimoda/scores/{label}" in tags["histograms"]
        assert f"fimoda/top_examples/{label}/text_summary" in tags["tensors"]
    assert "fimoda/agreement/mean/cosine/noise_ceiling" in tags["scalars"]
    assert "train_loss" in tags["scalars"]  # the training run's own logging is still there
    hist = acc.Histograms("fimoda/scores/grad_dot")[0].histogram_value
    assert hist.num == 6 * 4
    for name in ("agreement_mean_cosine", "agreement_full_spearman", "seed_averaging_mean", "sorted_scores"):
        image = acc.Images(f"fimoda/figures/{name}")[0]
        assert image.width > 300 and image.height > 200
    summary = acc.Tensors("fimoda/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "peak cosine" in summary and "grad_dot" in summary


def test_csv_logger_gets_the_scalar_metrics(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv")
    callback = fit_with(logger, tmp_path, plots=False)
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    columns = set(rows[0])
    assert {"fimoda/peak_cosine/mean/grad_dot", "fimoda/seconds/grad_cos", "train_loss"} <= columns
    values = [float(r["fimoda/agreement/full/cosine/grad_dot"]) for r in rows if r["fimoda/agreement/full/cosine/grad_dot"]]
    assert values == pytest.approx(callback.report.agreement("grad_dot", "full").mean.tolist(), abs=1e-9)


class BrokenLogger(Logger):
    """A logger whose every write fails."""

    name = "broken"
    version = 0

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("fimoda/") for k in metrics):
            raise RuntimeError("disk full")

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_a_failing_logger_only_warns(tmp_path):
    with pytest.warns(UserWarning, match="logging to BrokenLogger failed \\(RuntimeError: disk full\\)"):
        callback = fit_with(BrokenLogger(), tmp_path, output_dir=str(tmp_path / "out"))
    assert callback.report is not None and (tmp_path / "out" / "report.md").is_file()
