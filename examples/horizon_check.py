"""Horizon-matched influence on Energy or Concrete: agreement with the gold standard per epoch (issue 15).

The paper's MLP (8-128-128-1) is trained as ``examples/configs/{energy,concrete}_cpu.yaml`` do (Lightning,
SGD lr 0.3, batch 128, 1000 epochs, seed 0). Then, for 100 seeded leave-one-out instances and all tests
(Energy 77, Concrete 103): the gold standard (SGD lr 3e-2, batch 128, ``--epochs`` epochs, ``--seeds``
seeds, ``mean`` adjustment) and the estimators ``horizon`` (settings copied from the gold-standard loop;
Krylov path, and exact from the low-rank Gauss-Newton spectrum), ``grad_dot``, ``datainf`` and ``cg``. At
epoch ``t`` the horizon estimator's checkpoint ``t`` is compared with the gold standard at ``t``; the
others are one score matrix for all checkpoints. The defaults reproduce the Energy table of
``docs/results.md`` (20 epochs, shown 1/5/20).

    OMP_NUM_THREADS=1 python examples/horizon_check.py --data-dir ../shared/data \\
        [--dataset energy|concrete] [--epochs 20] [--shown 1,5,20] [--seeds 10] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch

from lightning_fimoda import FurtherTrainingLoop, build_estimator
from lightning_fimoda.evaluation.metrics import agreement
from lightning_fimoda.zoo.data import ConcreteDataModule, EnergyDataModule
from lightning_fimoda.zoo.models import MLP

DATASETS = {"energy": EnergyDataModule, "concrete": ConcreteDataModule}


def train_final_model(dataset: str, data_dir: str) -> tuple[MLP, L.LightningDataModule]:
    """The paper's MLP trained as the ``*_cpu.yaml`` configs do; returns it in eval mode and the set-up data."""
    L.seed_everything(0, verbose=False)
    model = MLP(input_dim=8, num_outputs=1, hidden=[128, 128], lr=0.3, seed=0)
    data = DATASETS[dataset](data_dir=data_dir, batch_size=128)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1000, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, check_val_every_n_epoch=1000)
    trainer.fit(model, data)
    data.setup("fit")
    return model.eval(), data


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min()


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> str:
    wall, cpu = _clock()
    return f"{wall - start[0]:.0f} s wall, {cpu - start[1]:.0f} s CPU"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="energy")
    parser.add_argument("--epochs", type=int, default=20, help="further-training epochs of the gold standard")
    parser.add_argument("--shown", default="1,5,20", help="comma-separated epochs to show (each <= --epochs)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    args.shown = tuple(int(e) for e in args.shown.split(","))
    if not all(1 <= e <= args.epochs for e in args.shown):
        parser.error(f"--shown epochs {args.shown} must lie in 1..{args.epochs}")
    return args


def print_table(model: MLP, train, test, loo: torch.Tensor, loop: FurtherTrainingLoop, gold: torch.Tensor,
                shown: tuple[int, ...]) -> None:
    """One Markdown row per estimator: mean cosine ± sem with the gold standard at each shown epoch."""
    task = model.attribution_task()
    estimators = [build_estimator("horizon", gold=loop, exact=False, label="horizon"),
                  build_estimator("horizon", gold=loop, exact=True, label="horizon_exact"), "grad_dot", "datainf", "cg"]
    print(f"\n| estimator | {' | '.join(f'epoch {e}' for e in shown)} | seconds |")
    print("|---|" + "---|" * (len(shown) + 1))
    krylov = None
    for spec in estimators:
        est = build_estimator(spec) if isinstance(spec, str) else spec
        tic = time.perf_counter()
        scores = est.fit(model, task, train, loo).score(test)
        seconds = time.perf_counter() - tic
        cells = []
        for e in shown:
            mine = scores[e - 1] if getattr(est, "checkpoint_indexed", False) else scores
            cos = agreement(mine, gold[e - 1])
            cells.append(f"{cos.mean:.3f} ± {cos.sem:.3f}")
        print(f"| {est.label} | {' | '.join(cells)} | {seconds:.1f} |", flush=True)
        if est.name == "horizon":
            extra = {k: est.info[k] for k in ("krylov_error", "krylov_dimension") if k in est.info}
            print(f"|   ({est.info['path']}: eta*lambda_max {est.info['eta_lambda_max']:.3f} {extra}) |")
            if est.info["path"] == "krylov":
                krylov = scores
            elif krylov is not None:
                print(f"|   (krylov vs exact: min cosine {float(_min_cosine(krylov, scores)):.6f}) |")


def main() -> None:
    args = parse_args()
    start = _clock()
    model, data = train_final_model(args.dataset, args.data_dir)
    model = model.to(args.device)
    train, test = data.train_dataset, data.test_dataset
    loo = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:100].sort().values
    print(f"{args.dataset}: threads {torch.get_num_threads()}, n = {len(train)}, tests {len(test)}, "
          f"final training {_since(start)}", flush=True)

    loop = FurtherTrainingLoop(model.attribution_task(), lr=3e-2, epochs=args.epochs, batch_size=128,
                               seeds=args.seeds, adjustments=("mean",), progress=False)
    tic = _clock()
    gold = loop.run(model, train, test, loo_indices=loo).scores("mean")  # [epochs, n_test, 100]
    print(f"gold standard ({args.epochs} epochs, {args.seeds} seeds): {_since(tic)} ({loop.info['engine']} engine)",
          flush=True)
    print_table(model, train, test, loo, loop, gold, args.shown)
    print(f"\ntotal {_since(start)}")


if __name__ == "__main__":
    main()
