"""Sending an :class:`~lightning_fimoda.AttributionReport` to the trainer's loggers.

Every logger gets the headline scalars through ``log_metrics`` at the trainer's last step (peak
agreement and its standard error, time, peak memory per estimator, mislabel AUC). A ``CSVLogger``
also gets the agreement curves, at step = further-training checkpoint (other loggers may require
steps to increase, so they get the headline only). A ``TensorBoardLogger`` gets, through its
``SummaryWriter``:

- scalars ``fimoda/agreement/<adjust>/<method>/<label>`` at step = checkpoint (and the noise ceiling;
  a checkpoint-indexed estimator's curve compares checkpoint ``c`` with the gold standard at ``c``);
- histograms ``fimoda/scores/<label>`` of all scores;
- images ``fimoda/figures/<name>`` (the figures of :mod:`~lightning_fimoda.evaluation.plotting`);
- texts ``fimoda/summary`` (the summary table) and ``fimoda/top_examples/<label>``.

A logger that fails is skipped with a warning: attribution results are never lost to logging.
"""

from __future__ import annotations

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure

from .metrics import METHODS
from .rendering import top_k_table
from .report import AttributionReport

__all__ = ["log_report", "scalar_metrics"]


def scalar_metrics(report: AttributionReport) -> dict[str, float]:
    """Flat ``{name: value}`` of the report's headline numbers."""
    out: dict[str, float] = {}
    for label in report.labels:
        out[f"fimoda/seconds/{label}"] = report.seconds.get(label, float("nan"))
        out[f"fimoda/peak_memory_mib/{label}"] = report.peak_memory.get(label, 0) / 2**20
        if report.gold is not None:
            for adjust in report.gold.adjustments:
                for method in METHODS:
                    _, mean, sem = report.agreement(label, adjust, method).peak()
                    out[f"fimoda/peak_{method}/{adjust}/{label}"] = mean
                    out[f"fimoda/peak_{method}_sem/{adjust}/{label}"] = sem
        auc = report.mislabel_auc(label)
        if auc is not None:
            out[f"fimoda/mislabel_auc/{label}"] = auc
    return out


def _curves(report: AttributionReport) -> dict[str, list[float]]:
    """Agreement curves ``{tag: [C values]}``, including the noise ceiling."""
    gold = report.require_gold()
    out = {}
    for adjust in gold.adjustments:
        for method in METHODS:
            for label in report.labels:
                out[f"fimoda/agreement/{adjust}/{method}/{label}"] = report.agreement(label, adjust, method).mean.tolist()
            ceiling = report.noise_ceiling(adjust, method)
            if ceiling is not None:
                out[f"fimoda/agreement/{adjust}/{method}/noise_ceiling"] = ceiling.mean.tolist()
    return out


def _log_tensorboard(logger: TensorBoardLogger, report: AttributionReport, figures: dict[str, Figure]) -> None:
    writer = logger.experiment
    if report.gold is not None:
        for tag, values in _curves(report).items():
            for checkpoint, value in zip(report.gold.checkpoints, values):
                writer.add_scalar(tag, value, global_step=checkpoint)
    for label, scores in report.scores.items():
        writer.add_histogram(f"fimoda/scores/{label}", scores.detach().cpu().float(), global_step=0)
        writer.add_text(f"fimoda/top_examples/{label}", "\n".join(top_k_table(report, label, max_tests=20)), global_step=0)
    for name, fig in figures.items():
        writer.add_figure(f"fimoda/figures/{name}", fig, global_step=0, close=False)
    writer.add_text("fimoda/summary", "    " + report.summary().replace("\n", "\n    "), global_step=0)
    writer.flush()


def log_report(
    loggers: list[Logger], report: AttributionReport, figures: dict[str, Figure] | None = None, step: int = 0
) -> None:
    """Log ``report`` to every logger (see the module doc); failures become warnings."""
    metrics = scalar_metrics(report)
    for logger in loggers:
        try:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger):
                _log_tensorboard(logger, report, figures or {})
            elif isinstance(logger, CSVLogger):
                _log_curves_by_checkpoint(logger, report)
            logger.save()
        except Exception as err:  # noqa: BLE001 - logging must never lose the results
            rank_zero_warn(f"FiMODA: logging to {type(logger).__name__} failed ({type(err).__name__}: {err}).")


def _log_curves_by_checkpoint(logger: Logger, report: AttributionReport) -> None:
    if report.gold is None:
        return
    curves = _curves(report)
    for c, checkpoint in enumerate(report.gold.checkpoints):
        logger.log_metrics({tag: v[c] for tag, v in curves.items()}, step=checkpoint)
