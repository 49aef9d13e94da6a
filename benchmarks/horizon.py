"""Cost of the ``horizon`` estimator (Krylov and exact paths) beside ``cg`` on the Concrete-sized MLP.

Problem (as ``benchmarks/influence.py``): 927 training × 103 test examples, 8 features, an 8-128-128-1
ReLU MLP with MSE (float32, P = 17,921), synthetic data, model trained briefly. ``horizon`` matches a
further training of SGD lr 3e-2, batch 128, 20 epochs (20 checkpoints from one Lanczos run per test
vector); ``cg`` runs with its default damping and tolerance. Rows are timed interleaved (A, B, C, A,
B, C, ...), each on a fresh gradient cache (per-sample gradients included), and the median of
``--repeats`` rounds is reported. The exact path eigendecomposes the dense ``[P, P]`` matrix; it is
timed on ``--exact-params`` (default: the last layer, P = 129), since at P = 17,921 it needs an
O(P³) eigendecomposition of a 1.3 GB matrix.

    .venv/bin/python benchmarks/horizon.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from influence import make_problem

from lightning_fimoda import SupervisedTask, build_estimator

ROWS = {
    "horizon (krylov, k=64)": ("horizon", {"lr": 3e-2, "epochs": 20, "batch_size": 128, "exact": False}),
    "horizon (krylov, k=32)": ("horizon", {"lr": 3e-2, "epochs": 20, "batch_size": 128, "exact": False,
                                           "krylov_steps": 32}),
    "cg": ("cg", {}),
}


def run_once(name: str, settings: dict, model, task, train, test) -> tuple[float, dict]:
    est = build_estimator(name, **settings)
    start = time.perf_counter()
    est.fit(model, task, train).score(test)
    return time.perf_counter() - start, est.info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exact-params", nargs="*", default=["4"], help="parameters for the exact-path row")
    args = parser.parse_args()
    model, train, test = make_problem(927, 103)
    task = SupervisedTask("mse")
    rows = dict(ROWS)
    rows[f"horizon (exact, params={args.exact_params})"] = (
        "horizon", {"lr": 3e-2, "epochs": 20, "batch_size": 128, "exact": True, "params": args.exact_params})
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
        note = info.get("path", "") + (f", krylov_error {info['krylov_error']:.1e}" if "krylov_error" in info else "")
        if "solver" in info:
            note = f"iterations {info['solver'].get('iterations', '?')}"
        print(f"| {label} | {statistics.median(ts):.2f} | {', '.join(f'{t:.2f}' for t in ts)} | {note} |")


if __name__ == "__main__":
    main()
