"""LiSSA with the paper's settings beside ours (a deliberate difference, so both numbers are shown).

Ours: at most 200 steps per estimate, ``scale = 1.1 ·`` the largest eigenvalue estimate of ``H + λI``
(:mod:`lightning_fimoda.solvers.lissa`). The paper (App. D.4, torch-influence): 5000 steps, one repeat,
the smallest scale of a ladder that does not diverge. Here the ladder is the powers of 10 from the
first one at or above half our eigenvalue estimate (below that the recursion diverges along the top
direction), tried in turn while the recursion diverges. To fit the CPU budget it scores the first
:data:`N_TESTS` test instances only, and both LiSSAs are compared on those. Scores are kept in
``<name>/lissa_paper/`` (:class:`~lightning_fimoda.score_store.ScoreStore`): a finished run is reused.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from lightning_fimoda import AttributionReport
from lightning_fimoda.pipeline import EstimatorRun, run_estimators
from lightning_fimoda.score_store import ScoreStore

from .runs import final_model

LABEL = "lissa_paper"
DEPTH = 5000
N_TESTS = 20
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
    marker = run_dir / LABEL / SCALE_FILE
    scales = [float(marker.read_text())] if marker.is_file() else ladder(report)
    run = None
    for scale in scales:
        spec = {"name": "lissa", "depth": DEPTH, "repeat": 1, "batch_size": 128, "scale": scale, "label": LABEL}
        (run,) = run_estimators(model, model.attribution_task(), train, test, [spec], report.train_indices,
                                report.test_indices[:N_TESTS], progress=False, store=store, keep_going=True)
        if run.ok:
            marker.write_text(repr(scale))
            return run
    return run


def lissa_pair(report: AttributionReport, run_dir: Path) -> AttributionReport | None:
    """Ours and the paper's LiSSA on the first :data:`N_TESTS` tests, against ``report``'s gold standard
    (restricted to those tests); ``None`` when the paper-setting run has not finished."""
    if not (run_dir / LABEL / SCALE_FILE).is_file() or "lissa" not in report.labels:
        return None
    run = run_lissa_paper(run_dir)  # loaded from its store: no LiSSA work
    gold = report.require_gold()
    tests = report.test_indices[:N_TESTS]
    keep = torch.isin(gold.test_indices, tests)
    gold = replace(gold, loo=gold.loo[:, :, keep], full=None if gold.full is None else gold.full[:, :, keep],
                   test_indices=gold.test_indices[keep])
    ours = report.scores["lissa"][:N_TESTS]
    return AttributionReport.from_scores({"lissa": ours, LABEL: run.scores}, report.train_indices, tests, gold,
                                         seconds={"lissa": report.seconds["lissa"], LABEL: run.seconds},
                                         settings={LABEL: run.settings}, seed_ks=[1])
