"""Distributed further training: 2 CPU processes (Lightning Fabric, DDP over gloo) shard the units and
both return exactly the single-process result, with and without a shared run_dir."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from lightning_fimoda import GoldStandard
from lightning_fimoda.further_training.store import RunStore

JOB = """
import sys
from pathlib import Path
import torch
from torch import nn
from torch.utils.data import TensorDataset
from lightning_fimoda import SupervisedTask
from lightning_fimoda.further_training import FurtherTrainingLoop


def build(run_dir=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    train = TensorDataset(torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64))
    test = TensorDataset(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
    loop = FurtherTrainingLoop(SupervisedTask(), optimizer="adam", lr=0.01, epochs=2, batch_size=6, seeds=3,
                               chunk_size=2, leave_out="drop", run_dir=run_dir, progress=False)
    return loop, (model, train, test, [1, 4, 9, 13, 19])


if __name__ == "__main__":
    from lightning.fabric import Fabric

    out = Path(sys.argv[1])
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    rank = fabric.global_rank
    loop, args = build()
    loop.run(*args).save(out / f"memory_rank{rank}.safetensors")
    assert loop.info["units_computed"] == 9, loop.info
    loop, args = build(out / "run")
    loop.run(*args).save(out / f"stored_rank{rank}.safetensors")
    loop, args = build(out / "run")
    loop.run(*args).save(out / f"resumed_rank{rank}.safetensors")
    assert loop.info["units_loaded"] == 9, loop.info
"""


def test_two_process_ddp_equals_single_process(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr

    namespace: dict = {}
    exec(compile(JOB, str(script), "exec"), namespace)
    loop, args = namespace["build"]()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): same kernels, bitwise comparable
    try:
        single = loop.run(*args)
    finally:
        torch.set_num_threads(threads)
    for name in ("memory", "stored", "resumed"):
        for rank in (0, 1):
            assert GoldStandard.load(tmp_path / f"{name}_rank{rank}.safetensors").equals(single), (name, rank)
    log = RunStore(tmp_path / "run").computed_log()
    assert len(log) == 9
    assert {line.split("rank=")[1] for line in log} == {"0", "1"}  # both ranks did work
