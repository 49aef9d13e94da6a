"""Per-sample gradients: the torch.func engine vs a per-example autograd loop, measured side by side.

Configuration (issue 3): a 927-example, 8-128-128-1 MLP with MSE (the Concrete training-set size).
Both ways produce the same ``[927, 17793]`` matrix (checked); the ratio of median times is printed.

The engine's result is a fresh 66 MB matrix, and with PyTorch's default CPU allocator most of its time
goes to the kernel's first touch of fresh 4 KiB pages (of the result and of vmap's intermediates).
PyTorch can back large allocations with 2 MiB transparent huge pages instead
(``THP_MEM_ALLOC_ENABLE=1``, read once when torch starts), so the benchmark measures both ways and the
loop in two child processes, one per allocator setting, each comparing engine and loop side by side.

    .venv/bin/python benchmarks/per_sample_grads.py

A second table (issue 17) measures how the engine flattens vmap's per-parameter gradients into the
``[N, P]`` rows, interleaved (A B C D A B C D …), medians of CPU time (``process_time``, one thread)
and wall time: ``torch.cat(..., out=rows)`` into the preallocated matrix (what the engine does), one
``copy_`` per parameter into views of the same buffer, ``vmap(grad)`` of a function of one flat ``[P]``
parameter vector (the rows come out flat, no concatenation), and ``vmap(grad)`` alone (the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import grad, vmap
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402

from lightning_fimoda import FunctionalTask, SupervisedTask, per_sample_gradients  # noqa: E402

SETTINGS = {"default allocator": "0", "THP_MEM_ALLOC_ENABLE=1": "1"}


def per_example_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The naive way: one forward and backward per example, gradients copied into a row."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.empty(len(x), sum(p.numel() for p in params))
    for i in range(len(x)):
        loss = (model(x[i : i + 1])[:, 0] - y[i : i + 1]).pow(2).sum()
        grads = torch.autograd.grad(loss, params)
        out[i] = torch.cat([g.reshape(-1) for g in grads])
    return out


def measure(n: int, repeats: int) -> dict:
    """Median seconds of the loop and the engine in this process (after checking they agree)."""
    torch.manual_seed(0)
    x, y = torch.randn(n, 8), torch.randn(n)
    model = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1)).eval()
    data, task = TensorDataset(x, y), SupervisedTask("mse")
    engine = per_sample_gradients(model, task, data).flat
    torch.testing.assert_close(engine, per_example_loop(model, x, y), rtol=1e-4, atol=1e-5)
    return {
        "num_params": engine.shape[1],
        "loop": median_seconds(lambda: per_example_loop(model, x, y), repeats),
        "engine": median_seconds(lambda: per_sample_gradients(model, task, data), repeats),
    }


def flattening_variants(n: int) -> dict:
    """The four ways of producing ``[n, P]`` rows (see the module docstring), each a callable."""
    torch.manual_seed(0)
    x, y = torch.randn(n, 8), torch.randn(n)
    model = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1)).eval()
    fn = FunctionalTask(model, SupervisedTask("mse"))
    single, values, names = fn.single("per_example_loss"), dict(fn.params), fn.names
    flat0 = fn.flatten(values)
    cols = dict(zip(names, torch.tensor([0] + [values[k].numel() for k in names]).cumsum(0).tolist()))
    per_param = vmap(grad(single), in_dims=(None, 0))
    per_flat = vmap(grad(lambda theta, ex: single(fn.unflatten(theta), ex)), in_dims=(None, 0))

    def cat_into_buffer():
        out, g = torch.empty(n, flat0.numel()), per_param(values, (x, y))
        return torch.cat([g[k].reshape(n, -1) for k in names], dim=1, out=out)

    def copy_into_views():
        out, g = torch.empty(n, flat0.numel()), per_param(values, (x, y))
        for k in names:
            out[:, cols[k] : cols[k] + values[k].numel()].view(n, *values[k].shape).copy_(g[k])
        return out

    variants = {"torch.cat into the preallocated [N, P] (engine)": cat_into_buffer,
                "copy_ per parameter into views of [N, P]": copy_into_views,
                "vmap(grad) over one flat [P] parameter": lambda: per_flat(flat0, (x, y)),
                "vmap(grad) alone, no [N, P] (floor)": lambda: per_param(values, (x, y))}
    reference = cat_into_buffer()
    torch.testing.assert_close(copy_into_views(), reference, rtol=0, atol=0)
    torch.testing.assert_close(per_flat(flat0, (x, y)), reference, rtol=1e-5, atol=1e-6)
    return variants


def measure_flattening(n: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Interleaved medians ``(CPU s, wall s)`` of each flattening variant (one warm-up round)."""
    variants = flattening_variants(n)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for round_ in range(repeats + 1):
        for name, fn in variants.items():
            cpu, wall = time.process_time(), time.perf_counter()
            fn()
            if round_:
                times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    return {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=927)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.n, args.repeats)))
        return

    results = {}
    for name, flag in SETTINGS.items():
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": flag}
        child = [sys.executable, __file__, "--child", "--n", str(args.n), "--repeats", str(args.repeats)]
        out = subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])

    p = next(iter(results.values()))["num_params"]
    print(f"per-sample gradients, {args.n} examples x {p} parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| allocator | per-example autograd loop (s) | lightning-fimoda engine, vmap(grad) (s) | speed-up |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['loop']:.4f} | {r['engine']:.4f} | {r['loop'] / r['engine']:.1f}x |")

    print(f"\nflattening per-parameter gradients into [{args.n}, {p}] rows, interleaved, median of "
          f"{args.repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| way | CPU s | wall s |")
    print("|---|---|---|")
    for name, (cpu, wall) in measure_flattening(args.n, args.repeats).items():
        print(f"| {name} | {cpu:.4f} | {wall:.4f} |")


if __name__ == "__main__":
    main()
