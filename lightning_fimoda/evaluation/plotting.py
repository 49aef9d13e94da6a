"""Figures of an :class:`~lightning_fimoda.AttributionReport` (matplotlib, no GUI backend needed).

- ``agreement_<adjust>_<method>``: agreement with further training against the further-training
  checkpoint, one line per estimator with a ± standard-error band, and the split-half noise ceiling
  (as the paper's Fig. 2);
- ``seed_averaging_<adjust>``: peak cosine similarity against the number of seeds averaged in the
  gold standard, with standard-error bars (as the paper's Fig. 3);
- ``sorted_scores``: each estimator's (last checkpoint's, if checkpoint-indexed) total score over the test instances, sorted, scaled to a
  maximum magnitude of 1, against the rank fraction (where the mass of helpful and harmful sits).

Figures are built as ``matplotlib.figure.Figure`` objects (not through ``pyplot``), so they do not
depend on or change the global backend, and are saved as PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .metrics import METHODS
from .report import AttributionReport

__all__ = ["agreement_figure", "render_figures", "save_figures", "seed_averaging_figure", "sorted_scores_figure"]

_METHOD_NAME = {"cosine": "cosine similarity", "spearman": "Spearman correlation"}


def _new_figure() -> tuple[Figure, object]:
    fig = Figure(figsize=(8.5, 4.5), dpi=110, layout="constrained")
    return fig, fig.add_subplot()


_PALETTE = [c for j, c in enumerate(matplotlib.colormaps["tab10"].colors) if j != 7]  # no grey: that is the ceiling
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_LINESTYLES = ("-", "--", "-.", ":")


def _style(i: int) -> dict[str, object]:
    """Distinct colour / line style / marker for curve ``i``: 9 colours (tab10 without its grey, which
    is the noise ceiling's), a new line style after every 9 curves and markers cycling with period 7,
    so that every (colour, line style, marker) triple is unique for the first 252 estimators."""
    return {
        "color": _PALETTE[i % len(_PALETTE)],
        "linestyle": _LINESTYLES[(i // len(_PALETTE)) % len(_LINESTYLES)],
        "marker": _MARKERS[i % len(_MARKERS)],
    }


def _integer_ticks(ax: object) -> None:
    """Checkpoints are whole epochs / steps: integer ticks only."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _finish(ax: object, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, title, grid, and the legend to the right of the axes (so it never hides a curve)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def agreement_figure(report: AttributionReport, adjust: str = "mean", method: str = "cosine") -> Figure:
    """Agreement curves over further-training checkpoints with ± s.e. bands (needs a gold standard)."""
    gold = report.require_gold()
    fig, ax = _new_figure()
    x = torch.tensor(gold.checkpoints, dtype=torch.float64).numpy()
    marker = "o" if len(x) <= 25 else None
    for i, label in enumerate(report.labels):
        curve = report.agreement(label, adjust, method)
        mean, sem = curve.mean.numpy(), torch.nan_to_num(curve.sem).numpy()
        style = _style(i) if marker else {**_style(i), "marker": None}
        name = f"{label} (horizon-matched)" if label in report.horizon_matched else label
        (line,) = ax.plot(x, mean, markersize=3.5, label=name, **style)
        ax.fill_between(x, mean - sem, mean + sem, color=line.get_color(), alpha=0.15, linewidth=0)
    ceiling = report.noise_ceiling(adjust, method)
    if ceiling is not None:
        mean, sem = ceiling.mean.numpy(), torch.nan_to_num(ceiling.sem).numpy()
        ax.plot(x, mean, color="0.35", linestyle="--", label=f"noise ceiling ({len(gold.seeds) // 2} vs "
                f"{len(gold.seeds) // 2} seeds)")
        ax.fill_between(x, mean - sem, mean + sem, color="0.5", alpha=0.15, linewidth=0)
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    _integer_ticks(ax)
    _finish(
        ax,
        f"further training ({gold.checkpoint_unit}s)",
        f"{_METHOD_NAME[method]} with further training",
        f"Agreement with further training ({adjust} adjustment, {len(gold.seeds)} seeds)\n"
        f"mean ± s.e. over {gold.test_indices.numel()} test instances, {gold.loo_indices.numel()} LOO instances",
    )
    return fig


def seed_averaging_figure(report: AttributionReport, adjust: str = "mean", method: str = "cosine") -> Figure:
    """Peak agreement against the number of seeds averaged per gold standard, with ± s.e. bars."""
    gold = report.require_gold()
    fig, ax = _new_figure()
    ks = report.seed_ks
    n = len(report.labels)
    for i, label in enumerate(report.labels):
        curves = report.seed_averaging(label, adjust, method)
        peaks = [curves[k].peak() for k in ks]
        means = [p[1] for p in peaks]
        sems = [0.0 if p[2] != p[2] else p[2] for p in peaks]
        dodge = 2 ** (0.04 * (i - (n - 1) / 2))  # side by side on the log axis, so bars do not overlap
        ax.errorbar([k * dodge for k in ks], means, yerr=sems, markersize=4, capsize=3, label=label, **_style(i))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    _finish(
        ax,
        "seeds averaged per gold standard (k)",
        f"peak {_METHOD_NAME[method]} over {gold.checkpoint_unit}s",
        f"Seed averaging ({adjust} adjustment): groups of k of {len(gold.seeds)} seeds\n"
        "mean ± s.e. over test instances and groups",
    )
    return fig


def sorted_scores_figure(report: AttributionReport) -> Figure:
    """Each estimator's per-training-instance total score (summed over tests), sorted and scaled."""
    fig, ax = _new_figure()
    for i, label in enumerate(report.labels):
        total = report.final_scores(label).to(torch.float64).sum(0)
        scale = total.abs().max()
        values = (total / scale if scale > 0 else total).sort(descending=True).values
        rank = (torch.arange(values.numel(), dtype=torch.float64) + 0.5) / values.numel()
        ax.plot(rank.numpy(), values.numpy(), label=label, **{**_style(i), "marker": None})
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    _finish(
        ax,
        "training instances ranked by total score (fraction: most helpful → most harmful)",
        "total score over test instances / max |total|",
        f"Sorted attribution scores ({report.train_indices.numel()} training instances, "
        f"summed over {report.test_indices.numel()} tests)\npositive = helpful, negative = harmful",
    )
    return fig


def render_figures(report: AttributionReport) -> dict[str, Figure]:
    """Every figure the report supports, by name."""
    figures: dict[str, Figure] = {}
    if report.gold is not None:
        for adjust in report.gold.adjustments:
            for method in METHODS:
                figures[f"agreement_{adjust}_{method}"] = agreement_figure(report, adjust, method)
            figures[f"seed_averaging_{adjust}"] = seed_averaging_figure(report, adjust)
    figures["sorted_scores"] = sorted_scores_figure(report)
    return figures


def save_figures(figures: dict[str, Figure], directory: str | os.PathLike) -> dict[str, Path]:
    """Write each figure as ``directory/<name>.png``; returns the paths by name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figures.items():
        paths[name] = directory / f"{name}.png"
        fig.savefig(paths[name])
    return paths
