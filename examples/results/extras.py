"""LiSSA with the paper's settings beside ours (a deliberate difference, so both numbers are shown).

Ours: at most 200 steps per estimate, ``scale = 1.1 ·`` the largest eigenvalue estimate of ``H + λI``
(:mod:`lightning_fimoda.solvers.lissa`). The paper (App. D.4, torch-influence): 5000 steps, one repeat,
the smallest scale of a ladder that does not diverge. Here the ladder is the powers of 10 from the
first one at or above half our eigenvalue estimate (below that the recursion diverges along the top
direction), tried in turn while the recursion diverges. Scores are kept in ``<name>/lissa_paper/``
(:class:`~lightning_fimoda.score_store.ScoreStore`): a finished run is reused.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from lightning_fimoda import AttributionReport
from lightning_fimoda.pipeline import EstimatorRun, run_estimators
from lightning_fimoda.score_store import ScoreStore

from .runs import final_model

LABEL = "lissa_paper"
DEPTH = 5000
SCALE_FILE = "scale.txt"  # the scale that converged, once found


def ladder(report: AttributionReport) -> list[float]:
    lam_max = float(report.settings["lissa"]["lissa_lambda_max"])
    first = 10.0 ** math.ceil(math.log10(lam_max / 2))
    return [first * 10**k for k in range(4)]


def run_lissa_paper(run_dir: Path) -> EstimatorRun:
    """LiSSA (Gauss-Newton) with 5000 steps and the smallest non-diverging power-of-10 scale."""
    report = AttributionReport.load(run_dir / "fimoda")
    model, train, test, _ = final_model(run_dir)
    store = ScoreStore(run_dir / LABEL)
    run = None
    marker = run_dir / LABEL / SCALE_FILE
    scales = [float(marker.read_text())] if marker.is_file() else ladder(report)
    for scale in scales:
        spec = {"name": "lissa", "depth": DEPTH, "repeat": 1, "batch_size": 128, "scale": scale, "label": LABEL}
        (run,) = run_estimators(model, model.attribution_task(), train, test, [spec], report.train_indices,
                                report.test_indices, progress=False, store=store, keep_going=True)
        if run.ok:
            marker.write_text(repr(scale))
            return run
    return run


def with_lissa_paper(report: AttributionReport, run_dir: Path) -> AttributionReport:
    """``report`` with the paper-setting LiSSA run added, when it was run (else unchanged)."""
    if not (run_dir / LABEL / SCALE_FILE).is_file():
        return report
    run = run_lissa_paper(run_dir)  # loaded from its store: no LiSSA work
    if not run.ok or LABEL in report.labels:
        return report
    return replace(report, runs=[*report.runs, run])
