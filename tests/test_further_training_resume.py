"""Resumable further training: a run killed with SIGKILL resumes without redoing finished units and gives
the identical result; a different configuration in the same run_dir is refused. Fault injection (issue 13):
random SIGKILLs, resumed each time, give the uninterrupted result bitwise and leave no temporary files;
two jobs racing for one run_dir: exactly one proceeds; a rank with other weights under torch.distributed
is refused on every rank."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_fimoda import GoldStandard
from lightning_fimoda.exceptions import RunDirBusyError
from lightning_fimoda.further_training.plan import TrainingPlan
from lightning_fimoda.further_training.store import RunStore
from lightning_fimoda.further_training.verify import verify_run_dir

JOB = """
import sys, time
from pathlib import Path
import torch
from torch import nn
from torch.utils.data import TensorDataset
from lightning_fimoda import SupervisedTask
from lightning_fimoda.exceptions import MismatchError
from lightning_fimoda.further_training import FurtherTrainingLoop
import lightning_fimoda.further_training.store as store


def build(run_dir, lr=0.05):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    train = TensorDataset(torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64))
    test = TensorDataset(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
    loop = FurtherTrainingLoop(SupervisedTask(), lr=lr, epochs=2, batch_size=6, seeds=4, chunk_size=2,
                               run_dir=run_dir, progress=False)
    return loop, (model, train, test, [1, 4, 9, 13, 19])


def slow_writes():
    save_file = store.save_file

    def slow(tensors, path, metadata=None):  # a kill can land while a unit's temporary file exists
        save_file(tensors, path, metadata=metadata)
        time.sleep(0.15)

    store.save_file = slow


if __name__ == "__main__":
    mode, run_dir = sys.argv[1], sys.argv[2]
    if mode == "units":  # make the kill land between units
        save = store.RunStore.save

        def slow_save(self, *args, **kwargs):
            save(self, *args, **kwargs)
            time.sleep(0.4)

        store.RunStore.save = slow_save
        loop, args = build(run_dir)
        loop.run(*args)
    elif mode == "kill":
        slow_writes()
        loop, args = build(run_dir)
        loop.run(*args)
    elif mode == "race":
        go = Path(run_dir).parent / "go"
        while not go.exists():
            time.sleep(0.01)
        loop, args = build(run_dir, lr=float(sys.argv[3]))
        try:
            loop.run(*args)
        except MismatchError as err:
            print(err)
            sys.exit(3)
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
    proc = subprocess.Popen([sys.executable, str(script), "units", str(run_dir)])
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


def test_a_live_job_holds_its_run_dir(tmp_path, job, monkeypatch):
    _, build = job
    run_dir = tmp_path / "run"
    loop, args = build(run_dir)
    holder = RunStore(run_dir)  # the same job, live in another process (flock: per open file)
    holder.bind(loop.plan(*args).fingerprint, {"engine": "vectorised", "chunk_size": 2})
    (run_dir / "units" / "x.safetensors.tmp").write_text("the holder's unit being written")
    with pytest.raises(RunDirBusyError, match=f"in use by another job \\(pid {os.getpid()} on "):
        loop.run(*args)
    assert (run_dir / "units" / "x.safetensors.tmp").exists()  # the holder's file was not cleaned up
    holder.unlock()

    def fail(*_args, **_kwargs):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as patch:
        patch.setattr(TrainingPlan, "compute", fail)
        failing, args = build(run_dir)
        with pytest.raises(RuntimeError, match="interrupted"):
            failing.run(*args)
    loop, args = build(run_dir)  # a failed run released the directory
    loop.run(*args)
    assert loop.info["units_computed"] == UNITS
    assert not (run_dir / "units" / "x.safetensors.tmp").exists()


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


def _script(tmp_path: Path) -> tuple[Path, dict]:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    namespace: dict = {}
    exec(compile(JOB, str(script), "exec"), namespace)
    return script, namespace


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _single_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: same kernels, bitwise comparable
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _units_done(run_dir: Path) -> int:
    return len(RunStore(run_dir).computed_log())


def test_random_sigkills_then_resume_equal_the_uninterrupted_run(tmp_path):
    script, ns = _script(tmp_path)
    run_dir = tmp_path / "run"
    rng = random.Random(20261202)
    kills, stale_seen = 0, False
    for attempt in range(3):
        before = _units_done(run_dir)
        proc = subprocess.Popen([sys.executable, str(script), "kill", str(run_dir)], env=_env())
        deadline = time.monotonic() + 60
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                writing = list((run_dir / "units").glob("*.tmp")) if run_dir.exists() else []
                if (attempt == 0 and writing) or (attempt and _units_done(run_dir) > before):
                    break  # the first kill lands mid-write, the others at a random moment after progress
                time.sleep(0.005)
            if attempt:
                time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        stale_seen |= bool(list(run_dir.rglob("*.tmp")))
        if proc.returncode == 0:
            break
    assert kills >= 2 and _units_done(run_dir) < UNITS
    assert stale_seen, "no kill landed mid-write"

    loop, args = ns["build"](run_dir)
    resumed = _single_thread(lambda: loop.run(*args))
    fresh_loop, args = ns["build"](tmp_path / "fresh")
    fresh = _single_thread(lambda: fresh_loop.run(*args))
    assert resumed.equals(fresh)  # bitwise
    assert loop.info["units_loaded"] + loop.info["units_computed"] == UNITS and loop.info["units_loaded"] >= 2
    assert not list(run_dir.rglob("*.tmp"))
    assert verify_run_dir(run_dir).ok


def test_two_jobs_racing_for_one_run_dir_exactly_one_proceeds(tmp_path):
    script, _ = _script(tmp_path)
    run_dir = tmp_path / "run"
    procs = [
        subprocess.Popen([sys.executable, str(script), "race", str(run_dir), lr], env=_env(),
                         stdout=subprocess.PIPE, text=True)
        for lr in ("0.05", "0.01")
    ]
    time.sleep(1.0)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], (codes, outs)
    loser = outs[[p.returncode for p in procs].index(3)]
    assert "differing: ['further_training']" in loser
    winner_lr = ("0.05", "0.01")[[p.returncode for p in procs].index(0)]
    stored = json.loads((run_dir / "config.json").read_text())["fingerprint"]["further_training"]
    assert stored["optimizer"]["lr"] == float(winner_lr)
    result = verify_run_dir(run_dir)
    assert result.ok and result.units_ok == UNITS  # only the winner's units, all verified


DISTRIBUTED = """
import sys
from pathlib import Path
import torch
import torch.distributed as dist

rank, port, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
sys.path.insert(0, str(out))
from job import build
from lightning_fimoda.exceptions import MismatchError

loop, (model, train, test, loo) = build(None)
if rank == 1:
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-3
try:
    loop.run(model, train, test, loo)
    (out / f"rank{rank}.txt").write_text("ran")
except MismatchError as err:
    (out / f"rank{rank}.txt").write_text(str(err))
dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort at exit)
dist.destroy_process_group()
"""


def test_rank_with_other_weights_is_refused_on_every_rank(tmp_path):
    _script(tmp_path)
    (tmp_path / "ranks.py").write_text(DISTRIBUTED)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [
        subprocess.Popen([sys.executable, str(tmp_path / "ranks.py"), str(r), port, str(tmp_path)], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for r in (0, 1):
        text = (tmp_path / f"rank{r}.txt").read_text()
        assert "rank 1 differs from rank 0 in ['model_digest']" in text, text
