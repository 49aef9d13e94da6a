"""Per-sample gradients: the torch.func engine vs a per-example autograd loop, measured side by side.

Configuration (issue 3): a 927-example, 8-128-128-1 MLP with MSE (the Concrete training-set size).
Both ways produce the same ``[927, 17793]`` matrix (checked); the ratio of median times is printed.

    .venv/bin/python benchmarks/per_sample_grads.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402

from lightning_fimoda import SupervisedTask, per_sample_gradients  # noqa: E402


def per_example_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The naive way: one forward and backward per example, gradients copied into a row."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.empty(len(x), sum(p.numel() for p in params))
    for i in range(len(x)):
        loss = (model(x[i : i + 1])[:, 0] - y[i : i + 1]).pow(2).sum()
        grads = torch.autograd.grad(loss, params)
        out[i] = torch.cat([g.reshape(-1) for g in grads])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=927)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = torch.randn(args.n, 8), torch.randn(args.n)
    model = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1)).eval()
    data, task = TensorDataset(x, y), SupervisedTask("mse")

    engine = per_sample_gradients(model, task, data).flat
    loop = per_example_loop(model, x, y)
    torch.testing.assert_close(engine, loop, rtol=1e-4, atol=1e-5)

    t_engine = median_seconds(lambda: per_sample_gradients(model, task, data), args.repeats)
    t_loop = median_seconds(lambda: per_example_loop(model, x, y), args.repeats)
    print(f"per-sample gradients, {args.n} examples x {engine.shape[1]} parameters, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| method | median seconds | speed-up |")
    print("|---|---|---|")
    print(f"| per-example autograd loop | {t_loop:.4f} | 1.0x |")
    print(f"| lightning-fimoda engine (vmap(grad)) | {t_engine:.4f} | {t_loop / t_engine:.1f}x |")


if __name__ == "__main__":
    main()
