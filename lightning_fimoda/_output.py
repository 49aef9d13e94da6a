"""The callback's output directory: checked before training, cleared of a previous report's files.

Layout of ``output_dir``::

    report.md, report.json, scores.safetensors, gold_standard.safetensors, *.png   this run's report
    estimators/<label>.safetensors   each estimator's scores, saved as soon as they exist (score_store)
    gold/<job id>/                   the gold standard's resumable run directory (further_training.store)

A new report replaces the previous one's files (with a notice); ``estimators/`` and ``gold/`` are kept,
so a rerun reuses every finished result whose fingerprint matches.
"""

from __future__ import annotations

import os
from pathlib import Path

from .evaluation.report import REPORT_FILES
from .exceptions import ConfigurationError

__all__ = ["check_writable", "clear_previous_report"]


def check_writable(directory: Path) -> None:
    """Raise :class:`ConfigurationError` unless ``directory`` exists as a writable folder or can be
    created (its nearest existing ancestor is a writable folder). Creates nothing."""
    path = directory.resolve()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "is not a folder" if not probe.is_dir() else "is not writable"
        raise ConfigurationError(f"output_dir {str(directory)!r} cannot be written: {str(probe)!r} {why}.")


def clear_previous_report(directory: Path) -> list[str]:
    """Remove a previous report's files (report files and ``*.png``) from ``directory``; print a notice."""
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.is_file() and (p.name in REPORT_FILES or p.suffix == ".png")]
    for path in stale:
        path.unlink()
    if stale:
        print(f"FiMODA: replaced the previous report in {directory} ({len(stale)} files; estimators/ and gold/ "
              "kept for reuse).", flush=True)
    return sorted(p.name for p in stale)
