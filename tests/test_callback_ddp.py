"""FiMODACallback under DDP (2 CPU processes, gloo): gold standard and estimators split, report on rank 0 only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from lightning_fimoda import attribute
from lightning_fimoda.evaluation.report import AttributionReport
from lightning_fimoda.further_training import FurtherTrainingLoop

from .lightning_helpers import TinyDataModule, TinyRegressor

REPO = Path(__file__).resolve().parents[1]
GOLD = dict(lr=0.02, epochs=2, batch_size=10, seeds=3, progress=False)

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from lightning.pytorch import seed_everything
    from lightning_fimoda.callback import FiMODACallback
    from tests.lightning_helpers import TinyDataModule, TinyRegressor, quiet_trainer

    out = sys.argv[1]
    seed_everything(0)
    callback = FiMODACallback(["grad_dot", "grad_cos"], gold={gold!r}, num_train=6, num_test=4,
                              output_dir=out + "/fimoda", print_summary=False)
    trainer = quiet_trainer(strategy="ddp", devices=2, callbacks=[callback])
    model = TinyRegressor()
    trainer.fit(model, datamodule=TinyDataModule())
    print(f"RANK {{trainer.global_rank}} REPORT {{callback.report is not None}}", flush=True)
    if trainer.is_global_zero:
        torch.save(model.state_dict(), out + "/final.pt")
    """
).format(gold=GOLD)


def test_ddp_two_processes_report_equals_single_process_computation(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LIGHTNING_FIMODA_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=500
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANK 0 REPORT True" in proc.stdout and "RANK 1 REPORT False" in proc.stdout
    report = AttributionReport.load(tmp_path / "fimoda")
    assert report.info["ranks"] == 2 and "- ranks: 2" in (tmp_path / "fimoda" / "report.md").read_text()

    # the same numbers from the saved final model, in this single process
    model = TinyRegressor()
    model.load_state_dict(torch.load(tmp_path / "final.pt"))
    dm = TinyDataModule()
    dm.setup()
    task = model.attribution_task()
    scores = attribute(model, task, dm.train_dataset, dm.test_dataset, ["grad_dot", "grad_cos"],
                       report.train_indices, report.test_indices)
    for label in ("grad_dot", "grad_cos"):
        assert torch.allclose(report.scores[label], scores[label], rtol=1e-10, atol=0)
    gold = FurtherTrainingLoop(task, **GOLD).run(
        model, dm.train_dataset, dm.test_dataset, report.train_indices, report.test_indices
    )
    assert torch.allclose(report.gold.loo, gold.loo, rtol=1e-10, atol=1e-14)
    assert torch.allclose(report.gold.full, gold.full, rtol=1e-10, atol=1e-14)
