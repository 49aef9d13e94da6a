"""Resumable further training: a run killed with SIGKILL resumes without redoing finished units and gives
the identical result; a different configuration in the same run_dir is refused."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from lightning_fimoda import GoldStandard
from lightning_fimoda.further_training.store import RunStore

JOB = """
import sys, time
import torch
from torch import nn
from torch.utils.data import TensorDataset
from lightning_fimoda import SupervisedTask
from lightning_fimoda.further_training import FurtherTrainingLoop
from lightning_fimoda.further_training.store import RunStore


def build(run_dir, lr=0.05):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    train = TensorDataset(torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64))
    test = TensorDataset(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
    loop = FurtherTrainingLoop(SupervisedTask(), lr=lr, epochs=2, batch_size=6, seeds=4, chunk_size=2,
                               run_dir=run_dir, progress=False)
    return loop, (model, train, test, [1, 4, 9, 13, 19])


if __name__ == "__main__":
    save = RunStore.save

    def slow_save(self, *args, **kwargs):  # make the kill land between units
        save(self, *args, **kwargs)
        time.sleep(0.4)

    RunStore.save = slow_save
    loop, args = build(sys.argv[1])
    loop.run(*args)
"""
UNITS = 4 * 3  # seeds x chunks of 2 out of 5 LOO instances


@pytest.fixture
def job(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    namespace: dict = {}
    exec(compile(JOB, str(script), "exec"), namespace)
    return script, namespace["build"]


def test_killed_run_resumes_without_recomputing(tmp_path, job):
    script, build = job
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)])
    deadline = time.monotonic() + 120
    try:
        while len(list((run_dir / "units").glob("*.safetensors"))) < 3:
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    finished = len(list((run_dir / "units").glob("*.safetensors")))
    assert 3 <= finished < UNITS
    assert len(RunStore(run_dir).computed_log()) == finished
    assert not (run_dir / "gold_standard.safetensors").exists()

    loop, args = build(run_dir)
    resumed = loop.run(*args)
    assert loop.info["units_loaded"] == finished and loop.info["units_computed"] == UNITS - finished
    log = RunStore(run_dir).computed_log()
    assert len(log) == UNITS  # every unit computed exactly once over both attempts
    assert len({line.split(" seconds")[0] for line in log}) == UNITS

    fresh_loop, args = build(tmp_path / "fresh")
    fresh = fresh_loop.run(*args)
    assert resumed.equals(fresh)
    assert GoldStandard.load(run_dir / "gold_standard.safetensors").equals(fresh)

    # a finished directory is only read
    again_loop, args = build(run_dir)
    assert again_loop.run(*args).equals(fresh)
    assert again_loop.info["units_computed"] == 0 and len(RunStore(run_dir).computed_log()) == UNITS


def test_different_configuration_is_refused(tmp_path, job):
    _, build = job
    loop, args = build(tmp_path / "run")
    loop.run(*args)
    other, args = build(tmp_path / "run", lr=0.01)
    with pytest.raises(ValueError, match=r"different configuration \(differing: \['further_training'\]\)"):
        other.run(*args)
    model, train, test, loo = args
    with torch.no_grad():
        model[0].weight.add_(1.0)
    same_settings, _ = build(tmp_path / "run")
    with pytest.raises(ValueError, match="model_digest"):
        same_settings.run(model, train, test, loo)
    with pytest.raises(ValueError, match="loo_indices"):
        build(tmp_path / "run")[0].run(*build(None)[1][:3], [1, 4])
