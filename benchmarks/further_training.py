"""Benchmark: leave-one-out further training on the Energy-sized configuration (SPEC §5).

8-128-128-1 ReLU MLP (float32), 691 synthetic training examples, 77 test instances, SGD with batch 128,
100 LOO instances plus the full run (101 runs), a few epochs. Measured side by side in one process:

- the vectorised engine, hand-written MLP kernel (``engine="mlp"``, what ``"auto"`` picks here);
- the vectorised engine, generic ``torch.func.vmap(grad)`` path (``engine="vectorised"``);
- the naive loop (``engine="sequential"``: deep copy + ``torch.optim`` per run) on a subset of runs,
  extrapolated per run to all 101 runs (the subset is stated in the output);
- the machine's float32 matrix-multiply rate: peak (best single 1024x1024 ``torch.mm``) and sustained
  (back-to-back products worth the engine's FLOPs, so measured over a similar window and load).

Achieved GFLOP/s counts the matmul FLOPs of training only (forward ``2·W`` per row, weight gradients
``2·W``, input gradients ``2·(W − W_1)``; ``W`` = weights of all Linear layers, ``W_1`` = first layer's),
over every row of every step of every run (the subtracted ``z_j`` row included). Each timing is the best
of ``--repeats`` runs, interleaved, to damp load from other processes, on two clocks: wall time, and
process CPU time divided by the number of threads (what the run would take with the cores to itself).

Run: ``.venv/bin/python benchmarks/further_training.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fimoda import SupervisedTask
from lightning_fimoda.further_training import FurtherTrainingLoop


def energy_like(n_train: int = 691, n_test: int = 77, d: int = 8, seed: int = 0):
    """Synthetic regression data of Energy's shape and a briefly trained 8-128-128-1 MLP."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, d, generator=gen)
    w = torch.randn(d, 2, generator=gen)
    y = (
        torch.sin(x @ w[:, :1])
        + 0.5 * (x @ w[:, 1:]).pow(2)
        + 0.1 * torch.randn(n_train + n_test, 1, generator=gen)
    )
    y = (y - y.mean()) / y.std()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        (model(x[:n_train]) - y[:n_train]).pow(2).mean().backward()
        opt.step()
    train = TensorDataset(x[:n_train], y[:n_train])
    test = TensorDataset(x[n_train:], y[n_train:])
    return model, train, test


def timed(fn):
    """``(result, wall seconds, CPU seconds / threads)``: the second clock discounts time the process
    spent waiting for cores taken by other processes (this machine is shared)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, (time.process_time() - cpu) / torch.get_num_threads()


def matmul_gflops(flops: float, size: int = 1024) -> tuple[tuple[float, float], tuple[float, float]]:
    """Float32 ``torch.mm`` rates (GFLOP/s) on each clock: ``(peak, sustained)``.

    ``peak``: the best single ``size``-square product; ``sustained``: back-to-back products worth
    ``flops``, i.e. over a window as long as the engine's run, under the same load.
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    per = 2 * size**3
    peak = [0.0, 0.0]
    for _ in range(10):
        _, *sec = timed(lambda: a @ b)
        peak = [max(p, per / t / 1e9) for p, t in zip(peak, sec)]
    reps = max(1, round(flops / per))
    _, *sec = timed(lambda: [a @ b for _ in range(reps)])
    return (peak[0], peak[1]), (reps * per / sec[0] / 1e9, reps * per / sec[1] / 1e9)


def training_flops(model: nn.Module, n: int, batch: int, epochs: int, m: int, full: bool) -> int:
    """Matmul FLOPs of training ``m`` subtract-LOO runs (+ the full run) for ``epochs`` epochs."""
    linears = [mod for mod in model.modules() if isinstance(mod, nn.Linear)]
    w = sum(mod.in_features * mod.out_features for mod in linears)
    w1 = linears[0].in_features * linears[0].out_features
    per_row = 2 * w + 2 * w + 2 * (w - w1)
    steps = epochs * math.ceil(n / batch)
    rows = m * (epochs * n + steps) + (epochs * n if full else 0)
    return per_row * rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--loo", type=int, default=100, help="number of LOO instances m")
    parser.add_argument("--naive-runs", type=int, default=10, help="LOO runs timed with the naive loop")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, train, test = energy_like()
    n = len(train)
    loo = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: args.loo]
    common = dict(
        task=SupervisedTask("mse"),
        optimizer="sgd",
        lr=3e-2,
        batch_size=128,
        epochs=args.epochs,
        seeds=1,
        leave_out="subtract",
        progress=False,
    )
    runs = args.loo + 1  # with the full run
    flops = training_flops(model, n, 128, args.epochs, args.loo, full=True)

    clocks = ("wall", "cpu")
    best = {(k, c): math.inf for k in ("mlp", "vectorised", "naive_per_run") for c in clocks}
    peak = dict.fromkeys(clocks, 0.0)
    sustained = dict.fromkeys(clocks, 0.0)
    results = {}
    for _ in range(args.repeats):
        rates = matmul_gflops(flops)
        for i, clock in enumerate(clocks):
            peak[clock] = max(peak[clock], rates[0][i])
            sustained[clock] = max(sustained[clock], rates[1][i])
        for engine in ("mlp", "vectorised"):
            loop = FurtherTrainingLoop(engine=engine, **common)
            results[engine], *seconds = timed(lambda loop=loop: loop.run(model, train, test, loo))
            for clock, sec in zip(clocks, seconds):
                best[engine, clock] = min(best[engine, clock], sec)
        naive = FurtherTrainingLoop(engine="sequential", **common)
        results["naive"], *seconds = timed(
            lambda naive=naive: naive.run(model, train, test, loo[: args.naive_runs])
        )
        for clock, sec in zip(clocks, seconds):
            best["naive_per_run", clock] = min(best["naive_per_run", clock], sec / (args.naive_runs + 1))

    report = {
        "config": f"8-128-128-1 MLP float32, n={n}, batch 128, SGD, {args.epochs} epochs, m={args.loo} "
        f"(+ full run), subtract, threads={torch.get_num_threads()}",
        "training_matmul_gflop": round(flops / 1e9, 2),
        "naive_runs_timed": args.naive_runs + 1,
    }
    for clock in clocks:
        naive_total = best["naive_per_run", clock] * runs
        row = {
            "matmul_peak_gflops": round(peak[clock], 1),
            "matmul_sustained_gflops": round(sustained[clock], 1),
            "naive_seconds_extrapolated": round(naive_total, 2),
        }
        for engine in ("mlp", "vectorised"):
            sec = best[engine, clock]
            row[engine] = {
                "seconds": round(sec, 3),
                "speedup_vs_naive": round(naive_total / sec, 1),
                "gflops": round(flops / sec / 1e9, 1),
                "fraction_of_matmul_peak": round(flops / sec / 1e9 / peak[clock], 3),
                "fraction_of_matmul_sustained": round(flops / sec / 1e9 / sustained[clock], 3),
            }
        report[clock] = row
    for engine in ("mlp", "vectorised"):
        sub = results[engine].loo[..., : args.naive_runs]
        report[f"{engine}_max_rel_diff_vs_naive"] = float(
            (sub - results["naive"].loo).abs().max() / results["naive"].loo.abs().max()
        )

    print(report["config"])
    print(
        f"training matmul FLOPs {report['training_matmul_gflop']} G; naive loop timed on "
        f"{args.naive_runs + 1} of {runs} runs and extrapolated per run"
    )
    for clock in clocks:
        row = report[clock]
        label = "wall clock" if clock == "wall" else "CPU time / threads"
        print(
            f"[{label}] matmul peak {row['matmul_peak_gflops']} GFLOP/s, sustained "
            f"{row['matmul_sustained_gflops']} GFLOP/s; naive loop {row['naive_seconds_extrapolated']} s"
        )
        for engine in ("mlp", "vectorised"):
            r = row[engine]
            print(
                f"  {engine:>10}: {r['seconds']:.3f} s  speed-up {r['speedup_vs_naive']}x  {r['gflops']} GFLOP/s "
                f"({100 * r['fraction_of_matmul_peak']:.0f}% of peak, "
                f"{100 * r['fraction_of_matmul_sustained']:.0f}% of sustained matmul)"
            )
    for engine in ("mlp", "vectorised"):
        print(f"  {engine} vs naive: max relative difference {report[f'{engine}_max_rel_diff_vs_naive']:.1e}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
