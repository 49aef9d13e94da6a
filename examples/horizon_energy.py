"""Horizon-matched influence on Energy: agreement with the gold standard at epochs 1 / 5 / 20 (issue 15).

The paper's MLP (8-128-128-1) is trained as ``examples/configs/energy_cpu.yaml`` does (Lightning, SGD
lr 0.3, batch 128, 1000 epochs, seed 0). Then, for 100 seeded leave-one-out instances and all 77 tests:
the gold standard (SGD lr 3e-2, batch 128, 20 epochs, 10 seeds, ``mean`` adjustment) and the estimators
``horizon`` (settings copied from the gold-standard loop; Krylov path, and exact from the low-rank
Gauss-Newton spectrum), ``grad_dot``, ``datainf`` and ``cg``. At epoch ``t`` the horizon estimator's
checkpoint ``t`` is compared with the gold standard at ``t``; the others are one score matrix for all.

    python examples/horizon_energy.py --data-dir ../shared/data [--seeds 10] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch

from lightning_fimoda import FurtherTrainingLoop, build_estimator
from lightning_fimoda.evaluation.metrics import agreement
from lightning_fimoda.zoo.data import EnergyDataModule
from lightning_fimoda.zoo.models import MLP

EPOCHS_SHOWN = (1, 5, 20)


def train_final_model(data_dir: str) -> tuple[MLP, EnergyDataModule]:
    L.seed_everything(0, verbose=False)
    model = MLP(input_dim=8, num_outputs=1, hidden=[128, 128], lr=0.3, seed=0)
    data = EnergyDataModule(data_dir=data_dir, batch_size=128)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1000, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, check_val_every_n_epoch=1000)
    trainer.fit(model, data)
    data.setup("fit")
    return model.eval(), data


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    start = time.perf_counter()
    model, data = train_final_model(args.data_dir)
    model = model.to(args.device)
    task, train, test = model.attribution_task(), data.train_dataset, data.test_dataset
    loo = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:100].sort().values
    print(f"threads {torch.get_num_threads()}, n = {len(train)}, tests {len(test)}, final training "
          f"{time.perf_counter() - start:.0f} s")

    loop = FurtherTrainingLoop(task, lr=3e-2, epochs=20, batch_size=128, seeds=args.seeds, adjustments=("mean",),
                               progress=False)
    tic = time.perf_counter()
    gold = loop.run(model, train, test, loo_indices=loo).scores("mean")  # [20, 77, 100]
    print(f"gold standard: {time.perf_counter() - tic:.0f} s ({loop.info['engine']} engine)")

    estimators = [build_estimator("horizon", gold=loop, exact=False, label="horizon"),
                  build_estimator("horizon", gold=loop, exact=True, label="horizon_exact"), "grad_dot", "datainf", "cg"]
    print(f"\n| estimator | {' | '.join(f'epoch {e}' for e in EPOCHS_SHOWN)} | seconds |")
    print("|---|" + "---|" * (len(EPOCHS_SHOWN) + 1))
    for spec in estimators:
        est = build_estimator(spec) if isinstance(spec, str) else spec
        tic = time.perf_counter()
        scores = est.fit(model, task, train, loo).score(test)
        seconds = time.perf_counter() - tic
        cells = []
        for e in EPOCHS_SHOWN:
            mine = scores[e - 1] if getattr(est, "checkpoint_indexed", False) else scores
            cos = agreement(mine, gold[e - 1])
            cells.append(f"{cos.mean:.3f} ± {cos.sem:.3f}")
        print(f"| {est.label} | {' | '.join(cells)} | {seconds:.1f} |")
        if est.name == "horizon":
            extra = {k: est.info[k] for k in ("krylov_error", "krylov_dimension") if k in est.info}
            print(f"|   ({est.info['path']}: eta*lambda_max {est.info['eta_lambda_max']:.3f} {extra}) |")
            if est.info["path"] == "krylov":
                krylov = scores
            else:
                print(f"|   (krylov vs exact: min cosine {float(_min_cosine(krylov, scores)):.6f}) |")
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
