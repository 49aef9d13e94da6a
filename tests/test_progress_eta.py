"""The further-training progress ETA: right within 20% after the first unit.

First on a simulated clock (warm-up in the first step, evaluation and storage after every unit,
uneven units), where a plain work/elapsed rate is 40% off; then measured on a real small job.
"""

from __future__ import annotations

import io
import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fimoda import SupervisedTask
from lightning_fimoda._progress import ClockBar, WorkClock
from lightning_fimoda.further_training import FurtherTrainingLoop


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(units: list[int], warmup: float, per_step: float, per_unit: float) -> tuple[float, float, float]:
    """``(ETA after unit 1, true remaining time, the plain work/elapsed ETA)`` of a simulated job."""
    clock_time = FakeTime()
    clock = WorkClock(timer=clock_time)
    total = sum(units)
    eta = naive = end_of_first = 0.0
    for u, steps in enumerate(units):
        for step in range(steps):
            clock_time.now += per_step + (warmup if u == step == 0 else 0.0)
            clock.advance(1)
        clock_time.now += per_unit  # test evaluation and storing the unit
        if u == 0:
            end_of_first = clock_time.now
            eta = clock.eta(total - clock.work)
            naive = clock.elapsed() / clock.work * (total - clock.work)
    return eta, clock_time.now - end_of_first, naive


def test_eta_leaves_out_the_warm_up_on_a_simulated_clock():
    eta, actual, naive = simulate([11, 10, 10, 7], warmup=5.0, per_step=1.0, per_unit=0.5)
    assert abs(eta - actual) < 0.05 * actual
    assert abs(naive - actual) > 0.4 * actual  # what a plain rate would have said


def test_eta_is_none_before_it_can_be_measured_and_the_bar_shows_it():
    clock_time = FakeTime()
    clock = WorkClock(timer=clock_time)
    assert clock.rate() is None and clock.eta(10) is None
    clock_time.now = 7.0
    clock.advance(2)  # the first piece: warm-up, no rate yet
    assert clock.eta(10) is None
    clock_time.now = 9.0
    clock.advance(4)
    assert clock.rate() == 2.0 and clock.eta(10) == 5.0
    out = io.StringIO()
    bar = ClockBar(total=16, file=out, clock=WorkClock(timer=clock_time), mininterval=0)
    bar.update(6)
    clock_time.now = 12.0
    bar.update(4)  # 4 run-steps in 3 s since the first piece: 6 left take 4.5 s
    assert bar.format_dict["rate"] == 4 / 3
    assert bar.clock.work == 10
    bar.close()
    assert "00:04" in out.getvalue().splitlines()[-1].split("\r")[-1]


def test_eta_after_the_first_unit_is_within_20_percent_on_a_real_job():
    """Measured: 5 units on the vectorised engine. The machine is shared, so the best of 3 attempts
    must be within 20% (each attempt is a full job with its own timing). Wall-clock ETAs mean nothing
    while other jobs take the cores, so the test skips when the load average exceeds 1.5x the core count
    (the suite's own threads account for about 1x)."""
    if os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1):
        pytest.skip(f"machine busy (load average {os.getloadavg()[0]:.1f}): wall-clock ETAs are not comparable")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).double()
    train = TensorDataset(torch.randn(96, 20, dtype=torch.float64), torch.randn(96, 1, dtype=torch.float64))
    test = TensorDataset(torch.randn(16, 20, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64))
    errors = []
    for _ in range(3):
        loop = FurtherTrainingLoop(
            SupervisedTask(), lr=0.01, batch_size=8, epochs=4, seeds=1, chunk_size=4, engine="vectorised",
            progress=False,
        )
        loop.run(model, train, test, list(range(20)))
        timing = loop.info["progress"]
        assert loop.info["units"] == 5 and len(timing["eta_after_unit"]) == 5
        actual = timing["seconds"] - timing["elapsed_after_unit"][0]
        errors.append(abs(timing["eta_after_unit"][0] - actual) / actual)
        if errors[-1] < 0.2:
            break
    assert min(errors) < 0.2, errors


def test_gold_standard_prints_one_line_per_unit_with_its_eta_when_not_a_terminal(capsys):
    """``progress=None`` outside a terminal (logs, CI): one stderr line per finished unit, the ETA from
    the unit clock, none after the last; ``progress=False`` prints nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    train = TensorDataset(torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64))
    test = TensorDataset(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 1, dtype=torch.float64))
    kwargs = dict(lr=0.01, batch_size=4, epochs=1, seeds=1, chunk_size=2, engine="vectorised")
    loop = FurtherTrainingLoop(SupervisedTask(), progress=None, **kwargs)
    loop.run(model, train, test, list(range(8)))
    err, units = capsys.readouterr().err.splitlines(), loop.info["units"]
    assert units >= 3 and len(err) == units
    assert all(line.startswith(f"fimoda: further-training unit {i}/{units} (seed 0, chunk ")
               for i, line in enumerate(err, start=1))
    assert all("ETA" in line for line in err[:-1]) and "ETA" not in err[-1]
    FurtherTrainingLoop(SupervisedTask(), progress=False, **kwargs).run(model, train, test, list(range(8)))
    assert capsys.readouterr().err == ""
