"""Per-sample gradients: the torch.func engine vs a per-example autograd loop, measured side by side.

Configuration (issue 3): a 927-example, 8-128-128-1 MLP with MSE (the Concrete training-set size).
Both ways produce the same ``[927, 17793]`` matrix (checked); the ratio of median times is printed.

The engine's result is a fresh 66 MB matrix, and with PyTorch's default CPU allocator most of its time
goes to the kernel's first touch of fresh 4 KiB pages (of the result and of vmap's intermediates).
PyTorch can back large allocations with 2 MiB transparent huge pages instead
(``THP_MEM_ALLOC_ENABLE=1``, read once when torch starts), so the benchmark measures both ways and the
loop in two child processes, one per allocator setting, each comparing engine and loop side by side.

    .venv/bin/python benchmarks/per_sample_grads.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402

from lightning_fimoda import SupervisedTask, per_sample_gradients  # noqa: E402

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


if __name__ == "__main__":
    main()
