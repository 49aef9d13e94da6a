"""Smoke tests of benchmarks/peers (issue 17): the harness on its own, and dattri when installed."""

from __future__ import annotations

import pytest
import torch

from benchmarks.peers import harness, ours, problems


@pytest.fixture(scope="module")
def tiny() -> problems.Problem:
    return problems.concrete(quick=True)


def test_harness_rows_ratio_cosine_and_reasons(tiny):
    run = ours.runner(tiny, "grad_dot")
    reference = run()

    def unsupported():
        raise harness.Unsupported("cannot express regression")

    rows = harness.measure(tiny.name, "grad_dot", run, {"scaled": lambda: -3.0 * -reference,
                                                         "nope": unsupported}, repeats=2, notes={})
    scaled, nope = rows
    assert len(scaled.ours.seconds) == len(scaled.theirs.seconds) == 2
    assert harness.cosine(scaled.ours.scores, scaled.theirs.scores) == pytest.approx(1.0, abs=1e-6)
    assert nope.reason == "cannot express regression" and nope.cells()[-1] == nope.reason
    flipped = harness.cosine(reference, -reference)
    assert flipped == pytest.approx(-1.0, abs=1e-6)


def test_damping_follows_spec_rule(tiny):
    from lightning_fimoda import per_sample_gradients

    g = per_sample_gradients(tiny.model, tiny.task, tiny.train).flat
    assert tiny.damping == pytest.approx(100.0 * g.pow(2).mean().item(), rel=1e-4)


def test_dattri_grad_dot_matches_ours(tiny):
    pytest.importorskip("dattri")
    from benchmarks.peers import peer_dattri

    mine = ours.runner(tiny, "grad_dot")()
    theirs = peer_dattri.grad_dot(tiny)
    assert theirs.shape == mine.shape
    torch.testing.assert_close(theirs, mine, rtol=1e-3, atol=1e-5)


def test_method_rows_runs_only_the_named_peers(tiny):
    from benchmarks.peers.__main__ import method_rows

    rows = method_rows(tiny, "grad_dot", repeats=1, deadline=float("inf"), only=["kronfluence"])
    assert [r.peer for r in rows] == ["kronfluence"]
    assert rows[0].reason or rows[0].cells()[-2] == "1.0000"  # cosine to ours, or why it could not run
