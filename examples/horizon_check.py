"""Horizon-matched influence: agreement with the gold standard at every checkpoint (issue 15).

The paper's MLP is trained as ``examples/configs/{energy,concrete,heloc}_cpu.yaml`` do (Lightning, batch
128, seed 0): Energy / Concrete 8-128-128-1, SGD lr 0.3 for 1000 epochs; HELOC 23-128-128-2
(cross-entropy), SGD lr 1e-2 for 100 epochs. Then, for 100 seeded leave-one-out instances and the tests
(Energy 77 and Concrete 103: all; HELOC: ``--num-test``, default 100 seeded, as the paper): the gold
standard (batch 128, ``--seeds`` seeds, ``mean`` adjustment; Energy / Concrete SGD lr 3e-2 for
``--epochs`` epochs (default 20), a checkpoint per epoch; HELOC lr 1e-3 for 2 epochs, a checkpoint every
14 steps, as ``heloc_cpu.yaml``) and the ``--estimators``: ``horizon`` (settings copied from the
gold-standard loop; Krylov path), ``horizon_exact`` (low-rank Gauss-Newton spectrum; not on HELOC, whose
17,766 factor rows are too many), ``grad_dot``, ``datainf``, ``cg`` and ``lissa`` (library defaults). At
checkpoint ``c`` the horizon estimator's checkpoint ``c`` is compared with the gold standard at ``c``; the
others are one score matrix for all checkpoints. ``--shown`` lists checkpoints (1-based; epochs on
Energy / Concrete). The defaults reproduce the Energy table of ``docs/results.md`` plus a LiSSA row.

    OMP_NUM_THREADS=1 python examples/horizon_check.py --data-dir ../shared/data \\
        [--dataset energy|concrete|heloc] [--epochs 20] [--shown 1,5,20] [--seeds 10] [--num-test 100] \\
        [--estimators horizon,grad_dot,datainf,cg,lissa] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import lightning as L
import torch

from lightning_fimoda import FurtherTrainingLoop, build_estimator
from lightning_fimoda.evaluation.metrics import agreement
from lightning_fimoda.zoo.data import ConcreteDataModule, EnergyDataModule, HELOCDataModule
from lightning_fimoda.zoo.models import MLP


@dataclass(frozen=True)
class Recipe:
    """Final training and further training of one ``*_cpu.yaml`` config."""

    datamodule: type
    input_dim: int
    num_outputs: int
    lr: float  # final training, SGD
    max_epochs: int
    further_lr: float
    further_epochs: int  # default of --epochs
    eval_every: str | int  # gold-standard checkpoints: "epoch" or every this many steps
    num_test: int | None  # default of --num-test (None: all)
    shown: str  # default of --shown
    estimators: str  # default of --estimators


ALL_ESTIMATORS = ("horizon", "horizon_exact", "grad_dot", "datainf", "cg", "lissa")
_UCI = dict(input_dim=8, num_outputs=1, lr=0.3, max_epochs=1000, further_lr=3e-2, further_epochs=20,
            eval_every="epoch", num_test=None, shown="1,5,20", estimators=",".join(ALL_ESTIMATORS))
DATASETS = {
    "energy": Recipe(EnergyDataModule, **_UCI),
    "concrete": Recipe(ConcreteDataModule, **_UCI),
    "heloc": Recipe(HELOCDataModule, input_dim=23, num_outputs=2, lr=1e-2, max_epochs=100, further_lr=1e-3,
                    further_epochs=2, eval_every=14, num_test=100, shown="1,5,10",
                    estimators="horizon,grad_dot,datainf,cg,lissa"),
}


def train_final_model(recipe: Recipe, data_dir: str) -> tuple[MLP, L.LightningDataModule]:
    """The paper's MLP trained as the ``*_cpu.yaml`` configs do; returns it in eval mode and the set-up data."""
    L.seed_everything(0, verbose=False)
    model = MLP(input_dim=recipe.input_dim, num_outputs=recipe.num_outputs, hidden=[128, 128], lr=recipe.lr, seed=0)
    data = recipe.datamodule(data_dir=data_dir, batch_size=128)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=recipe.max_epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        check_val_every_n_epoch=recipe.max_epochs)
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
    parser.add_argument("--epochs", type=int, help="further-training epochs of the gold standard (default: config's)")
    parser.add_argument("--shown", help="comma-separated checkpoints to show, 1-based (default: per dataset)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--num-test", type=int, help="seeded choice of test instances (default: per dataset)")
    parser.add_argument("--estimators", help=f"comma-separated subset of {','.join(ALL_ESTIMATORS)}")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    recipe = DATASETS[args.dataset]
    args.epochs = recipe.further_epochs if args.epochs is None else args.epochs
    args.num_test = recipe.num_test if args.num_test is None else args.num_test
    args.shown = tuple(int(e) for e in (args.shown or recipe.shown).split(","))
    args.estimators = tuple((args.estimators or recipe.estimators).split(","))
    if unknown := set(args.estimators) - set(ALL_ESTIMATORS):
        parser.error(f"--estimators: unknown {sorted(unknown)}; choose from {','.join(ALL_ESTIMATORS)}")
    if min(args.shown) < 1 or (recipe.eval_every == "epoch" and max(args.shown) > args.epochs):
        parser.error(f"--shown checkpoints {args.shown} must lie in 1..{args.epochs}")
    if args.epochs < 1 or args.seeds < 1 or (args.num_test is not None and args.num_test < 1):
        parser.error("--epochs, --seeds and --num-test must be >= 1")
    return args


def make_estimators(names: tuple[str, ...], loop: FurtherTrainingLoop) -> list:
    """The named estimators; the horizon ones copy the gold-standard loop's settings."""
    horizon = {"horizon": dict(exact=False, label="horizon"), "horizon_exact": dict(exact=True, label="horizon_exact")}
    return [build_estimator("horizon", gold=loop, **horizon[n]) if n in horizon else build_estimator(n) for n in names]


def print_table(model: MLP, train, test, loo: torch.Tensor, estimators: list, gold: torch.Tensor,
                shown: tuple[int, ...], steps: list[int]) -> None:
    """One Markdown row per estimator: mean cosine ± sem with the gold standard at each shown checkpoint."""
    task = model.attribution_task()
    print(f"\n| estimator | {' | '.join(f'checkpoint {e} (step {steps[e - 1]})' for e in shown)} | seconds |")
    print("|---|" + "---|" * (len(shown) + 1))
    krylov = None
    for est in estimators:
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
    recipe = DATASETS[args.dataset]
    model, data = train_final_model(recipe, args.data_dir)
    model = model.to(args.device)
    train, test = data.train_dataset, data.test_dataset
    gen = torch.Generator().manual_seed(0)  # training then test choice, as FiMODACallback's seed
    loo = torch.randperm(len(train), generator=gen)[:100].sort().values
    if args.num_test is not None:
        test = torch.utils.data.Subset(test, torch.randperm(len(test), generator=gen)[:args.num_test].sort().values)
    print(f"{args.dataset}: threads {torch.get_num_threads()}, n = {len(train)}, tests {len(test)}, "
          f"final training {_since(start)}", flush=True)

    loop = FurtherTrainingLoop(model.attribution_task(), lr=recipe.further_lr, epochs=args.epochs, batch_size=128,
                               eval_every=recipe.eval_every, seeds=args.seeds, adjustments=("mean",), progress=False)
    steps = loop.config.checkpoint_steps(len(train))
    if max(args.shown) > len(steps):
        raise SystemExit(f"--shown checkpoints {args.shown} must lie in 1..{len(steps)}")
    estimators = make_estimators(args.estimators, loop)
    tic = _clock()
    gold = loop.run(model, train, test, loo_indices=loo).scores("mean")  # [epochs, n_test, 100]
    print(f"gold standard ({args.epochs} epochs, {args.seeds} seeds): {_since(tic)} ({loop.info['engine']} engine)",
          flush=True)
    print_table(model, train, test, loo, estimators, gold, args.shown, steps)
    print(f"\ntotal {_since(start)}")


if __name__ == "__main__":
    main()
