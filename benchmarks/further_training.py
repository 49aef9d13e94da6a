"""Benchmark: leave-one-out further training on the Energy-sized configuration (SPEC §2).

8-128-128-1 ReLU MLP (float32), 691 synthetic training examples, 77 test instances, batch 128,
100 LOO instances plus the full run (101 runs), ``subtract``, a few epochs. Measured in one process,
interleaved repeat by repeat (each timing is the median over ``--repeats``):

- the machine's float32 matrix-multiply rate, two ways (best of a few products into a preallocated
  output, per repeat): a large square GEMM (``--square``-sized ``torch.mm``): **the reference**, the
  machine's rate whatever the model; and a GEMM of the kernel's shapes (``torch.bmm`` of
  101 × [129×128]·[128×128], the hidden layer's forward; the hidden layer is 95% of the FLOPs): the
  ceiling for this model's products;
- the vectorised engine with the hand-written MLP kernel (``engine="mlp"``, what ``"auto"`` picks), with
  SGD and with Adam, on both its paths: the compiled step (``further_training/native.py``, what it runs
  on CPU) and the ``torch.bmm`` path (``FIMODA_NATIVE=0``, what it runs elsewhere);
- the generic ``torch.func.vmap(grad)`` path (``engine="vectorised"``), SGD;
- the naive loop (``engine="sequential"``: deep copy + ``torch.optim`` per run), SGD and Adam, on a
  subset of runs, extrapolated per run to all 101 runs (the subset is stated in the output).
- with ``--groups 4,8,...``: temporal blocking's best case, runs trained ``g`` at a time with their state
  in cache from step to step (:func:`group_bound`), SGD and Adam;
- with ``--compiled``: one training step of all runs through ``torch.compile`` (inductor; default mode
  and max-autotune, SGD apart or fused into the graph) against the MLP kernel (:func:`compiled_bound`),
  per step, with the one-off compile timed apart.

Achieved GFLOP/s counts the matmul FLOPs of training only (forward ``2·W`` per row, weight gradients
``2·W``, input gradients ``2·(W − W_1)``; ``W`` = weights of all Linear layers, ``W_1`` = first layer's),
over every row of every step of every run (the subtracted ``z_j`` row included), divided by the whole
run's time (optimizer, data loading and test measurements included). Two clocks: wall time, and process
CPU time divided by the number of threads (what the run would take with the cores to itself).

Run: ``OMP_NUM_THREADS=1 python benchmarks/further_training.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fimoda import SupervisedTask
from lightning_fimoda.further_training import FurtherTrainingConfig, FurtherTrainingLoop
from lightning_fimoda.further_training.mlp import MLPKernel
from lightning_fimoda.further_training.optimizers import StackedOptimizer

CLOCKS = ("wall", "cpu")


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


def matmul_gflops(square: int, k: int, rows: int, width: int) -> dict[str, tuple[float, float]]:
    """Float32 GEMM rates (GFLOP/s, on each clock), best of a few products into a preallocated output.

    ``square``: ``torch.mm`` of two ``square × square`` matrices (the reference);
    ``kernel_shape``: ``torch.bmm`` of ``k`` × ``[rows × width]·[width × width]`` (the MLP's hidden layer).
    """
    cases = {
        "square": (torch.mm, (square, square), (square, square), 2 * square**3, 5),
        "kernel_shape": (torch.bmm, (k, rows, width), (k, width, width), 2 * k * rows * width * width, 3),
    }
    rates = {}
    for name, (fn, shape_a, shape_b, flops, tries) in cases.items():
        a, b = torch.randn(shape_a), torch.randn(shape_b)
        out = fn(a, b)
        best = [0.0, 0.0]
        for _ in range(tries):
            _, *sec = timed(lambda fn=fn, a=a, b=b, out=out: fn(a, b, out=out))
            best = [max(r, flops / t / 1e9) for r, t in zip(best, sec)]
        rates[name] = (best[0], best[1])
    return rates


def row_flops(model: nn.Module) -> int:
    """Matmul FLOPs of one training row: forward ``2·W``, weight gradients ``2·W``, input gradients
    ``2·(W − W_1)``."""
    linears = [mod for mod in model.modules() if isinstance(mod, nn.Linear)]
    w = sum(mod.in_features * mod.out_features for mod in linears)
    w1 = linears[0].in_features * linears[0].out_features
    return 2 * w + 2 * w + 2 * (w - w1)


def training_flops(model: nn.Module, n: int, batch: int, epochs: int, m: int, full: bool) -> int:
    """Matmul FLOPs of training ``m`` subtract-LOO runs (+ the full run) for ``epochs`` epochs."""
    steps = epochs * math.ceil(n / batch)
    rows = m * (epochs * n + steps) + (epochs * n if full else 0)
    return row_flops(model) * rows


def subtract_step_inputs(model: nn.Module, train: TensorDataset, g: int) -> tuple[dict, tuple]:
    """``g`` stacked copies of ``model``'s parameters and one ``subtract`` batch for them: 128 shared rows
    plus each run's own ``z_j`` (weight ``−1/n``), ``(x [g, 129, d], y [g, 129, 1], w [g, 129])``."""
    x, y = train.tensors
    xs = torch.cat([x[:128].expand(g, 128, x.shape[1]), x[128 : 128 + g].unsqueeze(1)], 1)
    ys = torch.cat([y[:128].expand(g, 128, 1), y[128 : 128 + g].unsqueeze(1)], 1)
    w = torch.full((g, 129), 1 / 128)
    w[:, -1] = -1 / len(train)
    params = {n: p.detach().unsqueeze(0).repeat(g, *([1] * p.dim())) for n, p in model.named_parameters()}
    return params, (xs, ys, w)


def group_bound(args: argparse.Namespace, groups: list[int]) -> dict[tuple[str, int], float]:
    """Temporal blocking of the runs, its best case: ``{(optimizer, g): GFLOP/s}`` (CPU time).

    ``g`` stacked runs step repeatedly on one ``subtract`` batch (128 shared rows + each run's ``z_j``)
    through the MLP kernel and the stacked optimizer, so their parameters, gradients, optimizer state and
    activations stay in cache from step to step, and nothing else runs (no data loading, checks or
    measurements): a grouped engine training ``g`` runs at a time for the whole schedule could not be
    faster. Interleaved over ``g``, medians of ``--repeats``.
    """
    model, train, _ = energy_like()
    cases = {}
    for opt, lr in (("sgd", 3e-2), ("adam", 1e-3)):
        for g in groups:
            params, (xs, ys, w) = subtract_step_inputs(model, train, g)
            optimizer = StackedOptimizer(FurtherTrainingConfig(epochs=1, optimizer=opt, lr=lr))
            state = optimizer.init(params)
            cases[opt, g] = (MLPKernel(model, SupervisedTask("mse")), params, optimizer, state, (xs, ys, w))
    seconds = {key: [] for key in cases}
    for _ in range(args.repeats):
        for (opt, g), (kernel, params, optimizer, state, batch) in cases.items():
            steps = max(4, 400 // g)

            def train_steps(kernel=kernel, params=params, optimizer=optimizer, state=state, batch=batch, steps=steps):
                for _ in range(steps):
                    optimizer.step(params, kernel.grad_and_value(params, *batch)[0], state)

            seconds[opt, g].append(timed(train_steps)[2] / steps)
    return {(opt, g): row_flops(model) * 129 * g / statistics.median(t) / 1e9 for (opt, g), t in seconds.items()}


def energy_step(chunk: int, lr: float | None):
    """The Energy MLP's (8-128-128-1 ReLU, MSE) weighted-loss gradients of ``K`` stacked runs, in chunks of
    ``chunk`` runs, as plain torch operations for ``torch.compile``: ``(params [W1, b1, W2, b2, W3, b3], each
    [K, ...]; x [K, R, 8], y [K, R, 1], w [K, R]) -> [gradients of the same layout..., losses [K]]``.
    With ``lr``, the SGD update ``θ ← θ − lr·g`` is fused in (in place on ``params``)."""

    def step(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> list:
        parts = []
        for i in range(0, w.shape[0], chunk):
            w1, b1, w2, b2, w3, b3 = (p[i : i + chunk] for p in params)
            xc, yc, wc = x[i : i + chunk], y[i : i + chunk], w[i : i + chunk]
            a1 = (torch.bmm(xc, w1.mT) + b1.unsqueeze(1)).relu()
            a2 = (torch.bmm(a1, w2.mT) + b2.unsqueeze(1)).relu()
            diff = torch.bmm(a2, w3.mT) + b3.unsqueeze(1) - yc
            d3 = 2 * diff * wc.unsqueeze(-1)
            d2 = torch.bmm(d3, w3) * (a2 > 0)
            d1 = torch.bmm(d2, w2) * (a1 > 0)
            grads = (torch.bmm(d1.mT, xc), d1.sum(1), torch.bmm(d2.mT, a1), d2.sum(1), torch.bmm(d3.mT, a2))
            parts.append((*grads, d3.sum(1), (diff.pow(2).sum(-1) * wc).sum(1)))
        out = [torch.cat(t) for t in zip(*parts)]
        if lr is not None:
            for p, g in zip(params, out):
                p.add_(g, alpha=-lr)
        return out

    return step


COMPILED = {  # name: (torch.compile mode, or the MLP kernel's path; SGD fused into the compiled graph)
    "mlp kernel (compiled step) + SGD (the engine)": ("native", False),
    "mlp kernel (bmm path) + SGD": ("bmm", False),
    "compiled (default mode) + SGD": ("default", False),
    "compiled (default mode), SGD fused": ("default", True),
    "compiled (max-autotune), SGD fused": ("max-autotune", True),
}


def compiled_bound(args: argparse.Namespace, chunk: int = 15, lr: float = 3e-2) -> dict[str, dict[str, float]]:
    """``torch.compile`` (inductor, CPU, static shapes, ``fullgraph``) of one training step of all ``K`` runs
    (:func:`energy_step`) against the MLP kernel (both paths) + stacked SGD, on one ``subtract`` batch (as
    :func:`group_bound` with ``g = K``): ``{variant: {"gflops", "compile_s", "max_rel_diff"}}``. CPU time per
    step, interleaved medians of ``--repeats``; the one-off compile (caches disabled) timed separately, and the
    gradients of the first step compared with the ``bmm`` path's."""
    import torch._inductor.config as inductor_config

    model, train, _ = energy_like()
    k = args.loo + 1
    optimizer = StackedOptimizer(FurtherTrainingConfig(epochs=1, optimizer="sgd", lr=lr))
    kernels = {path: MLPKernel(model, SupervisedTask("mse"), native=path == "native") for path in ("native", "bmm")}
    params, batch = subtract_step_inputs(model, train, k)
    reference = [g.clone() for g in kernels["bmm"].grad_and_value(params, *batch)[0].values()]
    cases, out = {}, {}
    for name, (mode, fused) in COMPILED.items():
        p = {n: t.clone() for n, t in params.items()}
        if mode in kernels:
            kernel = kernels[mode]
            grads = kernel.grad_and_value(p, *batch)[0].values()
            diff = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads, reference))
            cases[name] = lambda p=p, kernel=kernel: optimizer.step(p, kernel.grad_and_value(p, *batch)[0], {})
            out[name] = {"compile_s": 0.0, "max_rel_diff": diff}
            continue
        options = {"mode": mode} if mode != "default" else {}
        fn = torch.compile(energy_step(chunk, lr if fused else None), fullgraph=True, dynamic=False, **options)
        with inductor_config.patch(force_disable_caches=True):
            grads, compile_s, _ = timed(lambda fn=fn, p=p: fn(list(p.values()), *batch))
        diff = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads, reference))
        out[name] = {"compile_s": compile_s, "max_rel_diff": diff}
        if fused:
            cases[name] = lambda fn=fn, p=p: fn(list(p.values()), *batch)
        else:
            cases[name] = lambda fn=fn, p=p: optimizer.step(p, dict(zip(p, fn(list(p.values()), *batch))), {})
    seconds = {name: [] for name in cases}
    steps = 20
    for _ in range(args.repeats):
        for name, step in cases.items():
            seconds[name].append(timed(lambda step=step: [step() for _ in range(steps)])[2] / steps)
    for name, t in seconds.items():
        out[name].update(gflops=row_flops(model) * 129 * k / statistics.median(t) / 1e9, ms=1e3 * statistics.median(t))
    return out


WAYS = {  # name: (engine, optimizer, lr, FIMODA_NATIVE)
    "mlp kernel (compiled step), SGD": ("mlp", "sgd", 3e-2, "1"),
    "mlp kernel (compiled step), Adam": ("mlp", "adam", 1e-3, "1"),
    "mlp kernel (bmm path), SGD": ("mlp", "sgd", 3e-2, "0"),
    "mlp kernel (bmm path), Adam": ("mlp", "adam", 1e-3, "0"),
    "vmap(grad), SGD": ("vectorised", "sgd", 3e-2, "1"),
    "naive loop, SGD": ("sequential", "sgd", 3e-2, "1"),
    "naive loop, Adam": ("sequential", "adam", 1e-3, "1"),
}


def measure(args: argparse.Namespace) -> dict:
    """Interleaved timings: ``{"seconds": {(way, clock): [per repeat]}, "rates": {(gemm, clock): [...]},
    "diff": {way: max relative difference to the naive loop of the same optimizer}}``."""
    model, train, test = energy_like()
    n = len(train)
    loo = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: args.loo]
    common = dict(task=SupervisedTask("mse"), batch_size=128, epochs=args.epochs, seeds=1)
    common.update(leave_out="subtract", progress=False)
    seconds = {(w, c): [] for w in WAYS for c in CLOCKS}
    rates = {(g, c): [] for g in ("square", "kernel_shape") for c in CLOCKS}
    results = {}
    for _ in range(args.repeats):
        for gemm, pair in matmul_gflops(args.square, args.loo + 1, 129, 128).items():
            for clock, rate in zip(CLOCKS, pair):
                rates[gemm, clock].append(rate)
        for way, (engine, optimizer, lr, native) in WAYS.items():
            loop = FurtherTrainingLoop(engine=engine, optimizer=optimizer, lr=lr, **common)
            runs = loo[: args.naive_runs] if engine == "sequential" else loo
            os.environ["FIMODA_NATIVE"] = native
            results[way], *sec = timed(lambda loop=loop, runs=runs: loop.run(model, train, test, runs))
            os.environ.pop("FIMODA_NATIVE")
            for clock, t in zip(CLOCKS, sec):
                # the naive loop: per run, extrapolated to all runs (+ the full run)
                seconds[way, clock].append(t * (args.loo + 1) / (len(runs) + 1))
    diff = {}
    for way in WAYS:
        naive = results["naive loop, " + way.split(", ")[1]].loo
        diff[way] = float((results[way].loo[..., : args.naive_runs] - naive).abs().max() / naive.abs().max())
    return {"seconds": seconds, "rates": rates, "diff": diff, "n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--loo", type=int, default=100, help="number of LOO instances m")
    parser.add_argument("--naive-runs", type=int, default=10, help="LOO runs timed with the naive loop")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--square", type=int, default=1024, help="side of the reference square GEMM")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--groups", default="", help="comma-separated group sizes g: also measure temporal blocking's best case"
    )
    parser.add_argument(
        "--compiled", action="store_true", help="also measure torch.compile'd training steps (compiles take minutes)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = MLPKernel(energy_like()[0], SupervisedTask("mse")).path(torch.empty(0))
    if path != "compiled step":
        print(f"note: the compiled step will not run here, both mlp rows use {path}")
    m = measure(args)
    model = energy_like()[0]
    flops = training_flops(model, m["n"], 128, args.epochs, args.loo, full=True)
    med = {key: statistics.median(v) for key, v in {**m["seconds"], **m["rates"]}.items()}
    print(
        f"8-128-128-1 MLP float32, n={m['n']}, batch 128, {args.epochs} epochs, m={args.loo} (+ full run), "
        f"subtract, threads={torch.get_num_threads()}; {flops / 1e9:.2f} GFLOP of training matmuls; naive "
        f"loop timed on {args.naive_runs + 1} runs and extrapolated; medians of {args.repeats} interleaved repeats"
    )
    report = {
        "training_matmul_gflop": flops / 1e9,
        "threads": torch.get_num_threads(),
        "max_rel_diff": m["diff"],
    }
    for clock in CLOCKS:
        square, shape = med["square", clock], med["kernel_shape", clock]
        print(
            f"\n[{'wall clock' if clock == 'wall' else 'CPU time / threads'}] float32 GEMM: {args.square}² "
            f"square {square:.1f} GFLOP/s (reference), kernel-shape bmm {args.loo + 1}×[129×128]·[128×128] {shape:.1f} GFLOP/s"
        )
        print(
            "| way | seconds | speed-up vs naive (same optimizer) | GFLOP/s | % of square GEMM | % of kernel-shape bmm |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for way in WAYS:
            sec = med[way, clock]
            naive = med["naive loop, " + way.split(", ")[1], clock]
            rate = flops / sec / 1e9
            print(
                f"| {way} | {sec:.3f} | {naive / sec:.1f}x | {rate:.1f} | {100 * rate / square:.0f}% "
                f"| {100 * rate / shape:.0f}% |"
            )
            report[f"{clock}: {way}"] = {"seconds": sec, "gflops": rate, "of_square": rate / square}
        report[f"{clock}: gemm"] = {"square": square, "kernel_shape": shape}
    print("\nmax relative difference to the naive loop:", {w: f"{d:.1e}" for w, d in m["diff"].items()})
    if args.groups:
        groups = [int(g) for g in args.groups.split(",")]
        bound = group_bound(args, groups)
        square = med["square", "cpu"]
        print("\n[CPU time] temporal blocking, best case (see group_bound): runs trained g at a time")
        print("| g | SGD GFLOP/s | SGD % of square GEMM | Adam GFLOP/s | Adam % of square GEMM |")
        print("|---:|---:|---:|---:|---:|")
        for g in groups:
            sgd, adam = bound["sgd", g], bound["adam", g]
            print(f"| {g} | {sgd:.1f} | {100 * sgd / square:.0f}% | {adam:.1f} | {100 * adam / square:.0f}% |")
        report["group_bound_gflops"] = {f"{opt} g={g}": rate for (opt, g), rate in bound.items()}
    if args.compiled:
        rows = compiled_bound(args)
        square = med["square", "cpu"]
        print(f"\n[CPU time] one training step of all {args.loo + 1} runs (+ SGD), torch.compile against the MLP kernel")
        print("| variant | ms per step | GFLOP/s | % of square GEMM | one-off compile (s) | max rel. diff to bmm path |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, row in rows.items():
            print(
                f"| {name} | {row['ms']:.2f} | {row['gflops']:.1f} | {100 * row['gflops'] / square:.0f}% "
                f"| {row['compile_s']:.1f} | {row['max_rel_diff']:.1e} |"
            )
        report["compiled_step"] = rows
    print(json.dumps(report))


if __name__ == "__main__":
    main()
