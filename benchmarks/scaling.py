"""Streamed Grad-Dot: time and peak memory against the number of training examples at a fixed budget.

Configuration (issue 14): a ~1M-parameter CNN on 32x32x3 inputs (random data: only sizes matter),
Grad-Dot scores ``G_test G_trainᵀ`` with the ``T`` test gradients resident and the training gradients
streamed by :class:`~lightning_fimoda.gradients.GradientCache` in chunks set by the memory budget.
Each ``N`` runs in a fresh child process. CPU seconds (``time.process_time``) are shown beside wall
seconds: on a shared machine the wall time also measures other processes. Peak memory is
:class:`~lightning_fimoda.profiling.PeakMemory` above the level after the model and data were built.
Time should grow linearly in ``N``, peak stay flat.

    .venv/bin/python benchmarks/scaling.py                       # N = 1k, 2k, 4k, 8k
    .venv/bin/python benchmarks/scaling.py --sizes 250 500 1000 2000   # reduced
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fimoda import SupervisedTask
from lightning_fimoda.gradients import GradientCache, streamed_products
from lightning_fimoda.profiling import PeakMemory


def make_cnn(width: float = 1.0) -> nn.Module:
    """Three conv-pool stages and a two-layer head: 1.01M parameters at ``width=1``."""
    c1, c2, c3, h = (max(1, int(round(c * width))) for c in (32, 64, 128, 448))
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c3 * 16, h), nn.ReLU(), nn.Linear(h, 10),
    )


def measure(n: int, n_test: int, budget: int, width: float) -> dict:
    """One streamed Grad-Dot in this process: seconds, peak bytes, chunk and storage facts."""
    torch.manual_seed(0)
    model = make_cnn(width).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n + n_test, 3, 32, 32, generator=g)
    data = TensorDataset(x, torch.randint(0, 10, (n + n_test,), generator=g))
    task, train, test = SupervisedTask("cross_entropy"), torch.arange(n), torch.arange(n, n + n_test)
    cache = GradientCache(budget)
    with PeakMemory("cpu") as meter:
        start = time.perf_counter()
        g_test = cache.get(model, task, data, test, kind="measurement", what="test").flat
        test_seconds = time.perf_counter() - start
        wall, cpu = time.perf_counter(), time.process_time()
        stream = cache.stream(model, task, data, train)
        scores = streamed_products(stream, g_test.T).T
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert scores.shape == (n_test, n) and torch.isfinite(scores).all()
    return {"n": n, "seconds": wall, "cpu_seconds": cpu, "test_seconds": test_seconds, "peak": meter.peak_bytes,
            "params": stream.num_params, "storage": stream.storage, "budget": cache.memory_budget,
            "chunk_rows": cache.info["gradient_sets"]["training loss"].get("chunk_rows")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    parser.add_argument("--tests", type=int, default=100, help="test gradients held resident")
    parser.add_argument("--budget-mib", type=int, default=1024)
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier of the CNN")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget = args.budget_mib << 20
    if args.child is not None:
        print(json.dumps(measure(args.child, args.tests, budget, args.width)))
        return
    rows = []
    for n in args.sizes:
        child = [sys.executable, __file__, "--child", str(n), "--tests", str(args.tests),
                 "--budget-mib", str(args.budget_mib), "--width", str(args.width)]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    first = rows[0]
    print(f"streamed Grad-Dot, CNN with {first['params']:,} parameters, {args.tests} test gradients, "
          f"budget {args.budget_mib} MiB, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| N | seconds (wall) | CPU seconds | CPU s / 1k examples | peak MiB | budget MiB | training gradients |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        storage = f"{r['storage']}, chunks of {r['chunk_rows']}" if r["chunk_rows"] else r["storage"]
        print(f"| {r['n']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {1000 * r['cpu_seconds'] / r['n']:.1f} | "
              f"{r['peak'] / 2**20:.0f} | {r['budget'] / 2**20:.0f} | {storage} |")
    print(f"(seconds: the streamed pass over the N training examples; the {args.tests} resident test gradients "
          f"took {rows[0]['test_seconds']:.1f} s more; peak: above the level after building model and data, "
          "test gradients included)")


if __name__ == "__main__":
    main()
