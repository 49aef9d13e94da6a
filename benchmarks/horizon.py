"""Cost of the ``horizon`` estimator (Krylov and exact paths) beside ``cg`` on the Concrete-sized MLP.

Problem (as ``benchmarks/influence.py``): 927 training × 103 test examples, 8 features, an 8-128-128-1
ReLU MLP with MSE (float32, P = 17,793), synthetic data, model trained briefly. ``horizon`` matches a
further training of SGD lr 3e-2, batch 128, 20 epochs (20 checkpoints from one Lanczos run per test
vector); ``cg`` runs with its default damping and tolerance. Rows are timed interleaved (A, B, C, A,
B, C, ...), each on a fresh gradient cache (per-sample gradients included), and the median of
``--repeats`` rounds is reported. The exact low-rank path (what ``exact="auto"`` picks here: the
Gauss-Newton factor has R = 927 rows < P) eigendecomposes the ``[R, R]`` Gram matrix. The exact dense
path eigendecomposes the ``[P, P]`` matrix; it is timed on ``--exact-params`` (default: the last layer,
P = 129), since at P = 17,793 it needs an O(P³) eigendecomposition of a 1.3 GB matrix.

    .venv/bin/python benchmarks/horizon.py [--repeats 3]

``--drop-check`` instead runs the numerical check of ``leave_out="drop"`` quoted in
``docs/interpreting_scores.md``: least squares (3 features, n = 23, float64) at its minimiser, SGD lr
0.01, batch 5, 10 epochs, 400 seeds, ``mean`` adjustment; cosine of ``horizon`` with the ``subtract``
and ``drop`` gold standards, and between the two (a few minutes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from influence import make_problem
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fimoda import FurtherTrainingLoop, SupervisedTask, build_estimator
from lightning_fimoda.evaluation.metrics import agreement

ROWS = {
    "horizon (krylov, k <= 64, tol 1e-6)": ("horizon", {"lr": 3e-2, "epochs": 20, "batch_size": 128, "exact": False}),
    "horizon (exact, low rank)": ("horizon", {"lr": 3e-2, "epochs": 20, "batch_size": 128, "exact": "low_rank"}),
    "cg": ("cg", {}),
}


def run_once(name: str, settings: dict, model, task, train, test) -> tuple[float, dict]:
    est = build_estimator(name, **settings)
    start = time.perf_counter()
    est.fit(model, task, train).score(test)
    return time.perf_counter() - start, est.info


def drop_check(seeds: int = 400) -> None:
    def regression(n: int, seed: int) -> TensorDataset:  # as tests/conftest.py's make_regression
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        return TensorDataset(x, x.sum(dim=1) * 0.5 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))

    train, test = regression(23, 1), regression(4, 2)
    model = nn.Linear(3, 1).double()
    design = torch.cat([train.tensors[0], torch.ones(23, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, train.tensors[1].unsqueeze(1)).solution  # the minimiser
    with torch.no_grad():
        model.weight.copy_(solution[:3].T)
        model.bias.copy_(solution[3])
    task, settings = SupervisedTask("mse"), dict(lr=0.01, epochs=10, batch_size=5)
    scores = build_estimator("horizon", **settings).fit(model, task, train).score(test)
    golds = {}
    for leave_out in ("subtract", "drop"):
        loop = FurtherTrainingLoop(task, **settings, seeds=seeds, leave_out=leave_out, adjustments=("mean",),
                                   progress=False)
        golds[leave_out] = loop.run(model, train, test, loo_indices=list(range(23))).scores("mean")
    for t in (0, 4, 9):
        cos = {k: float(agreement(scores[t], gold[t]).mean) for k, gold in golds.items()}
        both = float(agreement(golds["subtract"][t], golds["drop"][t]).mean)
        print(f"epoch {t + 1}: horizon~subtract {cos['subtract']:.4f}, horizon~drop {cos['drop']:.4f}, "
              f"subtract~drop {both:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fixed-k", action="store_true", help="also Krylov with 64 steps, no early stop")
    parser.add_argument("--exact-params", nargs="*", default=["4"], help="parameters for the exact-path row")
    parser.add_argument("--drop-check", action="store_true", help="the leave_out='drop' check instead")
    args = parser.parse_args()
    if args.drop_check:
        drop_check()
        return
    model, train, test = make_problem(927, 103)
    task = SupervisedTask("mse")
    rows = dict(ROWS)
    if args.fixed_k:
        rows["horizon (krylov, k = 64, tol 0)"] = (
            "horizon", {"lr": 3e-2, "epochs": 20, "batch_size": 128, "exact": False, "krylov_tol": 0.0})
    rows[f"horizon (exact dense, params={args.exact_params})"] = (
        "horizon", {"lr": 3e-2, "epochs": 20, "batch_size": 128, "exact": "dense", "params": args.exact_params})
    rows[f"cg (params={args.exact_params})"] = ("cg", {"params": args.exact_params})
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, P = "
          f"{sum(p.numel() for p in model.parameters())}, n_train 927, n_test 103, {args.repeats} rounds")
    times: dict[str, list[float]] = {label: [] for label in rows}
    infos: dict[str, dict] = {}
    for _ in range(args.repeats):
        for label, (name, settings) in rows.items():
            seconds, infos[label] = run_once(name, settings, model, task, train, test)
            times[label].append(seconds)
    print("\n| row | median s | all rounds | notes |\n|---|---|---|---|")
    for label, ts in times.items():
        info = infos[label]
        note = info.get("path", "") + (f", krylov_error {info['krylov_error']:.1e}, dimension "
                                        f"{info['krylov_dimension']}" if "krylov_error" in info else "")
        if "solver" in info:
            note = f"iterations {info['solver'].get('iterations', '?')}"
        print(f"| {label} | {statistics.median(ts):.2f} | {', '.join(f'{t:.2f}' for t in ts)} | {note} |")


if __name__ == "__main__":
    main()
