"""Quick start (`make demo`): attribution with every estimator, checked against further training.

On scikit-learn's diabetes data (embedded, no download) this trains the paper's MLP (10-128-128-1) with a
Lightning ``Trainer``; at the end of ``fit``, ``FiMODACallback`` scores 60 training patients for 20 test
patients with every registered estimator, runs a small leave-one-out further-training gold standard, and
prints how well each estimator agrees with it and what it cost. It writes the report (``report.md``,
safetensors), PNG figures and TensorBoard logs under ``fimoda_runs/quickstart``.

Sign convention (SPEC §1): a positive score means the training example is *helpful* — leaving it out
would raise the test loss.

    make demo                                   # or: .venv/bin/python examples/quickstart.py
    .venv/bin/tensorboard --logdir fimoda_runs  # scalars, histograms, figures, top-example tables
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_fimoda import FiMODACallback
from lightning_fimoda.zoo.data import DiabetesDataModule
from lightning_fimoda.zoo.models import MLP

# Every registered estimator, with CPU-friendly settings where the defaults are built for accuracy.
ESTIMATORS = [
    "grad_dot",
    "grad_cos",
    "datainf",
    {"name": "explicit", "params": ["net.4"], "label": "explicit_last_layer"},
    "cg",
    {"name": "lissa", "depth": 200, "repeat": 2, "batch_size": 64},
    {"name": "lissa", "hessian": "exact", "damping_scale": 1000.0, "depth": 200, "repeat": 2, "batch_size": 64,
     "label": "lissa_h"},
    {"name": "arnoldi", "rank": 50},
    "ekfac",
    "kfac",
    "diagonal",
    {"name": "trak", "proj_dim": 2048},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fimoda_runs", help="where to write logs, report and figures")
    parser.add_argument("--seeds", type=int, default=8, help="further-training seeds of the gold standard")
    args = parser.parse_args()
    start = time.perf_counter()

    L.seed_everything(0, verbose=False)
    data = DiabetesDataModule(batch_size=64)
    model = MLP.from_datamodule(data, lr=0.05)  # provides attribution_task(): SupervisedTask("mse")
    callback = FiMODACallback(
        estimators=ESTIMATORS,
        gold={"optimizer": "sgd", "lr": 0.005, "epochs": 10, "batch_size": 64, "seeds": args.seeds},
        num_train=60,   # scored training examples = the leave-one-out set of the gold standard
        num_test=20,
        output_dir=str(Path(args.out) / "quickstart"),
    )
    trainer = L.Trainer(
        max_epochs=60,
        accelerator="cpu",
        logger=TensorBoardLogger(args.out, name="quickstart_tb"),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)  # the callback prints the agreement table at the end

    report = callback.report
    top = report.top_k("grad_dot", k=3)
    print("\nMost helpful / harmful training patients by grad_dot (dataset indices):")
    for row in range(3):
        print(f"  test {int(report.test_indices[row])}: helpful {top.helpful_indices[row].tolist()}, "
              f"harmful {top.harmful_indices[row].tolist()}")
    print(f"\nReport, figures and TensorBoard logs under {args.out}/ ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
