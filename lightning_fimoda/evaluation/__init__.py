"""Evaluation against the gold standard and its rendering.

``metrics`` (agreement, Spearman, seed averaging, noise ceiling, mislabel AUC, top-k), ``report``
(:class:`AttributionReport`: the runs and the gold standard as data, saved and loaded exactly),
``rendering`` (console table, Markdown, the top-k table), ``plotting`` (matplotlib figures) and
``tensorboard`` (logging a report to Lightning loggers).
"""

from .report import AttributionReport

__all__ = ["AttributionReport"]
