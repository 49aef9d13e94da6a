"""Re-training from scratch vs further training on Energy: does any estimator approximate re-training?

The paper (Appendix E.1, "Comparison to re-training", Figure 11) finds every gradient-based method's
cosine with leave-one-out *re-training* near 0 on the tabular regression data, while its cosine with
*further training* is high. This script checks it on Energy with ``examples/configs/energy_cpu.yaml``'s
model (MLP 8-128-128-1, seed 0), recipe (SGD, batch 128, lr 0.3), estimators, LOO set (100 seeded
training instances) and tests (all 77):

1. the initial weights ``θ₀`` (the model before training) are kept, the model trained with Lightning as
   the config does (1000 epochs; ``--final-epochs`` for a quick look);
2. the estimators score the final model (mean adjustment, every test instance);
3. further training (the config's gold standard: SGD lr 0.03, 20 epochs) with ``--further-seeds`` seeds
   (the config: 20);
4. leave-one-out re-training from ``θ₀`` with the same recipe but ``--epochs`` epochs (the recipe: 1000)
   for each mechanism of ``--leave-out`` (``drop``: ``z_j`` removed, true LOO re-training; ``subtract``)
   with ``--seeds`` seeds; its scores are those after the last epoch.

Printed: one Markdown table, each estimator's cosine (mean ± s.e. over tests) with further training (peak
over its 20 epochs and at epoch 20) and with re-training, plus two reference rows: further training's own
scores, and a split-half ceiling of re-training (seeds 0..S/2-1 against the rest: how reproducible the
re-training scores themselves are). A second table follows the re-training over its epochs (``--shown``):
the split-half ceiling, Grad-Dot and the best estimator at each. Default reduction (to fit ≤ 10 min on 2
busy cores): re-training runs 80 epochs of the recipe's 1000 (480 of its 6000 steps) with 3 seeds,
further training 4 seeds (the config: 20). ``--run-dir`` makes the re-training resumable.

    OMP_NUM_THREADS=1 python examples/retraining_check.py --data-dir ../shared/data \\
        [--epochs 80] [--seeds 3] [--further-seeds 4] [--leave-out drop,subtract] [--shown 1,10,40,80] \\
        [--run-dir runs/retrain]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from lightning_fimoda import FurtherTrainingLoop, RetrainingLoop, build_estimator
from lightning_fimoda.evaluation.metrics import agreement
from lightning_fimoda.zoo.data import EnergyDataModule
from lightning_fimoda.zoo.models import MLP

CONFIG = Path(__file__).parent / "configs" / "energy_cpu.yaml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--epochs", type=int, default=80, help="re-training epochs (the recipe: 1000)")
    parser.add_argument("--final-epochs", type=int, help="final training epochs (default: the config's 1000)")
    parser.add_argument("--seeds", type=int, default=3, help="re-training seeds (sample orders)")
    parser.add_argument("--further-seeds", type=int, default=4, help="further-training seeds (config: 20)")
    parser.add_argument("--leave-out", default="drop,subtract", help="re-training mechanisms, comma-separated")
    parser.add_argument("--shown", help="re-training epochs of the second table (default: 1,10,E/2,E)")
    parser.add_argument("--run-dir", type=Path, help="resumable run directories of the re-training go below it")
    args = parser.parse_args()
    args.leave_out = tuple(args.leave_out.split(","))
    default = f"1,10,{args.epochs // 2},{args.epochs}"
    args.shown = sorted({int(e) for e in (args.shown or default).split(",") if 1 <= int(e) <= args.epochs})
    counts = (args.epochs, args.seeds - 1, args.further_seeds, args.final_epochs or 1)
    if set(args.leave_out) - {"drop", "subtract"} or min(counts) < 1:
        parser.error("--leave-out takes drop and/or subtract; epochs and seeds >= 1, --seeds >= 2 (split half)")
    return args


def train_final_model(config: dict[str, Any], data_dir: str, epochs: int) -> tuple[MLP, dict, EnergyDataModule]:
    """The config's model trained for ``epochs``; returns it (eval mode), its initial weights and the data."""
    L.seed_everything(config["seed_everything"], verbose=False)
    model = MLP(**config["model"]["init_args"])
    theta0 = copy.deepcopy(model.state_dict())
    data = EnergyDataModule(data_dir=data_dir, batch_size=config["data"]["init_args"]["batch_size"])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, check_val_every_n_epoch=epochs)
    trainer.fit(model, data)
    data.setup("fit")
    return model.eval(), theta0, data


def estimator_scores(specs: list, model: MLP, train, test, loo: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{label: scores [n_test, m]}`` of the config's estimators (skipped with a note when one fails)."""
    out = {}
    for spec in specs:
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        label = spec.get("label", spec["name"])
        try:
            est = build_estimator(spec.pop("name"), **spec)
            out[label] = est.fit(model, model.attribution_task(), train, loo).score(test)
        except (ImportError, RuntimeError, ValueError) as err:
            print(f"{label}: skipped ({type(err).__name__}: {err})", flush=True)
    return out


def cosine(scores: torch.Tensor, gold: torch.Tensor) -> str:
    a = agreement(scores, gold)
    return f"{float(a.mean):.3f} ± {float(a.sem):.3f}"


def print_table(scores: dict[str, torch.Tensor], further: torch.Tensor, retrain: dict[str, Any], epochs: int) -> None:
    """Cosines with further training (``[20, T, m]``) and with re-training (``{mechanism: GoldStandard}``)."""
    mechanisms = list(retrain)
    print(f"\n| estimator | further training: peak (epoch) | at epoch {further.shape[0]} | "
          + " | ".join(f"re-training ({m}, epoch {epochs})" for m in mechanisms) + " |")
    print("|---|---:|---:|" + "---:|" * len(mechanisms))
    ends = {m: g.scores("mean")[-1] for m, g in retrain.items()}
    rows = {**scores, "*further training (epoch 1)*": further[0]}
    for label, s in rows.items():
        i, mean, sem = agreement(s, further).peak()
        cells = [f"{mean:.3f} ± {sem:.3f} ({i + 1})", cosine(s, further[-1])]
        print(f"| {label} | {' | '.join(cells + [cosine(s, ends[m]) for m in mechanisms])} |")
    halves = [f"{float(a.mean[-1]):.3f} ± {float(a.sem[-1]):.3f}" for a in map(split_half, retrain.values())]
    print(f"| *re-training split-half ceiling* | | | {' | '.join(halves)} |")


def split_half(gold: Any) -> Any:
    """Cosine (mean ± s.e. over tests, curves ``[C]``) of the first half of the seeds' scores with the rest's."""
    half = len(gold.seeds) // 2
    return agreement(gold.scores("mean", gold.seeds[:half]), gold.scores("mean", gold.seeds[half:]))


def print_curve(scores: dict[str, torch.Tensor], retrain: dict[str, Any], shown: list[int]) -> None:
    """Per shown re-training epoch and mechanism: split-half ceiling, Grad-Dot, best estimator."""
    mechanisms = list(retrain)
    print("\n| re-training epoch | " + " | ".join(f"{m}: ceiling | {m}: grad_dot | {m}: best" for m in mechanisms) + " |")
    print("|---:|" + "---:|---:|---|" * len(mechanisms))
    for e in shown:
        cells = []
        for g in retrain.values():
            at = g.scores("mean")[e - 1]
            means = {label: float(agreement(s, at).mean) for label, s in scores.items()}
            best = max(means, key=means.get)
            dot = f"{means['grad_dot']:.3f}" if "grad_dot" in means else "n/a"
            cells += [f"{float(split_half(g).mean[e - 1]):.3f}", dot, f"{best} {means[best]:.3f}"]
        print(f"| {e} | {' | '.join(cells)} |")


def main() -> None:
    args = parse_args()
    config = yaml.safe_load(CONFIG.read_text())
    fimoda, gold_cfg, recipe = config["fimoda"], config["fimoda"]["gold"], config["model"]["init_args"]
    start = time.perf_counter()
    final_epochs = args.final_epochs or config["trainer"]["max_epochs"]
    model, theta0, data = train_final_model(config, args.data_dir, final_epochs)
    train, test = data.train_dataset, data.test_dataset
    gen = torch.Generator().manual_seed(fimoda["seed"])  # as FiMODACallback chooses the LOO set
    loo = torch.randperm(len(train), generator=gen)[: fimoda["num_train"]].sort().values
    print(f"energy: n = {len(train)}, tests {len(test)}, m = {loo.numel()}, threads {torch.get_num_threads()}; "
          f"final training ({final_epochs} epochs) {time.perf_counter() - start:.0f} s", flush=True)

    tic = time.perf_counter()
    scores = estimator_scores(fimoda["estimators"], model, train, test, loo)
    print(f"estimators {time.perf_counter() - tic:.0f} s", flush=True)
    tic = time.perf_counter()
    further = FurtherTrainingLoop(
        model.attribution_task(), lr=gold_cfg["lr"], epochs=gold_cfg["epochs"], batch_size=gold_cfg["batch_size"],
        seeds=args.further_seeds, adjustments=("mean",), progress=False,
    ).run(model, train, test, loo).scores("mean")
    print(f"further training ({gold_cfg['epochs']} epochs, {args.further_seeds} seeds) "
          f"{time.perf_counter() - tic:.0f} s", flush=True)

    retrain = {}
    for leave_out in args.leave_out:
        tic = time.perf_counter()
        loop = RetrainingLoop(
            model.attribution_task(), initial_weights=theta0, lr=recipe["lr"], momentum=recipe.get("momentum", 0.0),
            weight_decay=recipe.get("weight_decay", 0.0), epochs=args.epochs,
            batch_size=config["data"]["init_args"]["batch_size"], seeds=args.seeds, leave_out=leave_out,
            adjustments=("mean",), progress=False,
            run_dir=args.run_dir / f"{leave_out}_{args.epochs}ep" if args.run_dir else None,
        )
        retrain[leave_out] = loop.run(model, train, test, loo)
        print(f"re-training ({leave_out}, {args.epochs} epochs, {args.seeds} seeds, {loop.info['engine']} engine, "
              f"{loop.info['units_loaded']} units resumed) {time.perf_counter() - tic:.0f} s", flush=True)
    print_table(scores, further, retrain, args.epochs)
    print_curve(scores, retrain, args.shown)
    print(f"\ntotal {time.perf_counter() - start:.0f} s wall")


if __name__ == "__main__":
    main()
