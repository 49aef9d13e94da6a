"""Every registered estimator vs straightforward sequential implementations, measured in one run.

Configuration (issue 4): 927 training × 103 test examples (the Concrete split sizes) on an 8-128-128-1
ReLU MLP with MSE (float32), synthetic data, model trained briefly. Each registered estimator gets a
row automatically (``available_estimators()``; settings from ``SETTINGS``, default otherwise), plus
true-Hessian rows for CG and LiSSA. Each row is fitted on its own fresh gradient cache, so its time
and memory include the per-sample gradients it needs.

The sequential baselines work one example at a time, as older influence-function code does:
per-example autograd gradients (train gradients computed once and kept — generous to the baseline),
then one solve per test instance with one autograd Hessian-vector product per call (double backward
for the true Hessian; the ``R``-op trick of two extra backward passes for Gauss-Newton), same
tolerance / depth / scale / damping as the batched estimator it is compared with. Sequential DataInf
loops over training examples per test instance (as DataInf's reference code does); sequential Arnoldi
runs the same Lanczos iteration with autograd products and one vector at a time. Sequential LiSSA
is timed on the first ``--sequential-tests`` test instances and scaled linearly to all of them
(every test instance costs the same: ``depth`` products); the table says so.

Peak memory: ``lightning_fimoda.profiling.PeakMemory`` — on CPU the process's resident set size
sampled every 2 ms by a thread (psutil), above the level at the start of each row.

    .venv/bin/python benchmarks/influence.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_fimoda import SupervisedTask, available_estimators, build_estimator
from lightning_fimoda.attribute import run_estimators
from lightning_fimoda.profiling import PeakMemory, memory_kind

SETTINGS: dict[str, dict] = {  # per-name settings; unnamed estimators run with their defaults
    "lissa": {"depth": 1000, "batch_size": 128},
    "arnoldi": {"rank": 50},
}
EXTRA_ROWS: list[tuple[str, str, dict]] = [  # (label, registry name, settings) beyond one row per name
    ("cg (hessian='exact')", "cg", {"hessian": "exact"}),
    ("lissa (hessian='exact')", "lissa", {"depth": 1000, "batch_size": 128, "hessian": "exact"}),
]


@dataclass
class Row:
    label: str
    seconds: float | None
    peak_bytes: int | None
    note: str = ""
    scores: Tensor | None = None
    settings: dict | None = None


def make_problem(n_train: int, n_test: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 8, generator=g)
    y = torch.sin(x[:, :4]).sum(dim=1) + 0.5 * x[:, 4] * x[:, 5] + 0.1 * torch.randn(len(x), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xt, yt = x[:n_train], y[:n_train]
    for _ in range(300):
        opt.zero_grad()
        (model(xt)[:, 0] - yt).pow(2).mean().backward()
        opt.step()
    model.eval()
    return model, TensorDataset(xt, yt), TensorDataset(x[n_train:], y[n_train:])


# -- sequential baselines: one example / one test instance at a time, autograd only ----------------
class Sequential:
    def __init__(self, model: nn.Module, train: TensorDataset, test: TensorDataset) -> None:
        self.model, self.train, self.test = model, train, test
        self.params = [p for p in model.parameters()]

    def _flat(self, grads) -> Tensor:
        return torch.cat([g.reshape(-1) for g in grads])

    def _split(self, v: Tensor) -> list[Tensor]:
        out, start = [], 0
        for p in self.params:
            out.append(v[start : start + p.numel()].view_as(p))
            start += p.numel()
        return out

    def grads(self, data: TensorDataset) -> Tensor:
        x, y = data.tensors
        rows = []
        for i in range(len(x)):
            loss = (self.model(x[i : i + 1])[:, 0] - y[i : i + 1]).pow(2).sum()
            rows.append(self._flat(torch.autograd.grad(loss, self.params)))
        return torch.stack(rows)

    def hvp(self, v: Tensor, idx: Tensor | None = None) -> Tensor:
        x, y = self.train.tensors if idx is None else (self.train.tensors[0][idx], self.train.tensors[1][idx])
        loss = (self.model(x)[:, 0] - y).pow(2).mean()
        g = torch.autograd.grad(loss, self.params, create_graph=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(g, self._split(v)))
        return self._flat(torch.autograd.grad(dot, self.params))

    def gnvp(self, v: Tensor, idx: Tensor | None = None) -> Tensor:
        x = self.train.tensors[0] if idx is None else self.train.tensors[0][idx]
        out = self.model(x)
        u = torch.zeros_like(out, requires_grad=True)
        g = torch.autograd.grad(out, self.params, grad_outputs=u, create_graph=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(g, self._split(v)))
        jv = torch.autograd.grad(dot, u)[0]  # J v, by the R-op trick
        return self._flat(torch.autograd.grad(out, self.params, grad_outputs=2.0 * jv / len(x)))

    def cg(self, b: Tensor, matvec: Callable[[Tensor], Tensor], tol: float, max_iter: int) -> Tensor:
        x, r = torch.zeros_like(b), b.clone()
        p, rs = r.clone(), r @ r
        for _ in range(max_iter):
            if rs.sqrt() <= tol * b.norm():
                break
            ap = matvec(p)
            alpha = rs / (p @ ap)
            x, r = x + alpha * p, r - alpha * ap
            rs_new = r @ r
            p, rs = r + (rs_new / rs) * p, rs_new
        return x

    def lissa(self, v: Tensor, matvec, lam: float, scale: float, depth: int, batch: int, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        h = v.clone()
        n = len(self.train)
        for _ in range(depth):
            idx = torch.randperm(n, generator=gen)[:batch]
            h = v + h - (matvec(h, idx) + lam * h) / scale
        return h / scale

    def layer_slices(self) -> list[slice]:
        """Column range of each module's parameters (weight + bias), as DataInf's layers."""
        owners = [name.rsplit(".", 1)[0] for name, _ in self.model.named_parameters()]
        out, start = [], 0
        for i, p in enumerate(self.params):
            if i > 0 and owners[i] == owners[i - 1]:
                out[-1] = slice(out[-1].start, start + p.numel())
            else:
                out.append(slice(start, start + p.numel()))
            start += p.numel()
        return out

    def datainf(self, g_x: Tensor, g_train: Tensor, c: float) -> Tensor:
        """DataInf's ``v_x = Σ_l (1/λ_l)[g_xl − (1/n) Σ_i (g_xl·g_il) g_il / (λ_l + ‖g_il‖²)]``, one
        training example at a time (the reference implementation's loop)."""
        n = len(g_train)
        v = torch.empty_like(g_x)
        for sl in self.layer_slices():
            lam = c * g_train[:, sl].pow(2).mean().item()
            acc = torch.zeros_like(g_x[sl])
            for g_i in g_train[:, sl]:
                acc += (g_x[sl] @ g_i) / (lam + g_i @ g_i) * g_i
            v[sl] = (g_x[sl] - acc / n) / lam
        return v

    def lanczos(self, matvec: Callable[[Tensor], Tensor], steps: int, seed: int) -> tuple[Tensor, Tensor]:
        """Ritz pairs of ``H`` after ``steps`` Lanczos steps, one Hessian-vector product per step."""
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(sum(p.numel() for p in self.params), generator=gen)
        q = q / q.norm()
        basis, alphas, betas = [], [], []
        for _ in range(steps):
            basis.append(q)
            w = matvec(q)
            alphas.append(q @ w)
            for _pass in range(2):  # full re-orthogonalisation, twice, one vector at a time
                for b in basis:
                    w = w - (b @ w) * b
            betas.append(w.norm())
            q = w / betas[-1]
        tri = torch.diag(torch.stack(alphas)) + torch.diag(torch.stack(betas[:-1]), 1) + torch.diag(
            torch.stack(betas[:-1]), -1)
        evals, s = torch.linalg.eigh(tri)
        return evals, s.T @ torch.stack(basis)


def timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float, int]:
    with PeakMemory("cpu") as meter:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, meter.peak_bytes


def sequential_rows(seq: Sequential, fitted: dict[str, Row], args) -> dict[str, Row]:
    """Sequential counterparts of grad_dot, cg, lissa (both Hessian types), datainf and arnoldi, keyed by
    row label."""
    n = len(seq.train)
    rows: dict[str, Row] = {}

    def per_test(solve_one: Callable[[Tensor], Tensor], tests: TensorDataset) -> Tensor:
        """``(1/n) (H + λI)^{-1} g_x · g_j``, one test instance (one solve) at a time."""
        g_train = seq.grads(seq.train)
        return torch.stack([solve_one(g) for g in seq.grads(tests)]) @ g_train.T / n

    def grad_dot() -> Tensor:
        return seq.grads(seq.test) @ seq.grads(seq.train).T

    scores, s, m = timed(grad_dot)
    rows["grad_dot"] = Row("sequential grad_dot (per-example autograd)", s, m, scores=scores)

    for label in ("cg", "cg (hessian='exact')"):
        if label not in fitted or fitted[label].settings is None:
            continue
        st = fitted[label].settings
        matvec_h = seq.hvp if st["hessian"] == "exact" else seq.gnvp
        lam = st["damping"]

        def solve(st=st, matvec_h=matvec_h, lam=lam) -> Tensor:
            return per_test(lambda g: seq.cg(g, lambda v: matvec_h(v) + lam * v, st["tol"], st["max_iter"]),
                            seq.test)

        scores, s, m = timed(solve)
        rows[label] = Row(f"sequential {label} (per-test CG, autograd products)", s, m, scores=scores)

    if "datainf" in fitted and fitted["datainf"].settings is not None:
        c = fitted["datainf"].settings["damping_scale"]

        def datainf() -> Tensor:
            g_train = seq.grads(seq.train)
            return torch.stack([seq.datainf(g, g_train, c) for g in seq.grads(seq.test)]) @ g_train.T

        scores, s, m = timed(datainf)
        rows["datainf"] = Row("sequential datainf (loop over training examples)", s, m, scores=scores)

    if "arnoldi" in fitted and fitted["arnoldi"].settings is not None:
        st = fitted["arnoldi"].settings
        lam, rank = st["damping"], st["rank"]
        steps = st["iterations"] or 2 * rank + 20

        def arnoldi() -> Tensor:
            evals, vecs = seq.lanczos(seq.gnvp, steps, st["seed"])
            keep = evals.abs().argsort(descending=True)[:rank]
            evals, vecs = evals[keep], vecs[keep]

            def solve_one(g: Tensor) -> Tensor:
                coeff = vecs @ g
                return (coeff / (evals + lam)) @ vecs + (g - coeff @ vecs) / lam

            return per_test(solve_one, seq.test)

        scores, s, m = timed(arnoldi)
        rows["arnoldi"] = Row("sequential arnoldi (Lanczos, autograd products)", s, m, scores=scores)

    for label in ("lissa", "lissa (hessian='exact')"):
        if label not in fitted or fitted[label].settings is None:
            continue
        st = fitted[label].settings
        matvec_h = seq.hvp if st["hessian"] == "exact" else seq.gnvp
        k = min(args.sequential_tests, len(seq.test))

        def solve(st=st, matvec_h=matvec_h, k=k) -> Tensor:
            return per_test(
                lambda g: seq.lissa(g, matvec_h, st["damping"], st["lissa_scale"], st["solver"]["steps"], st["batch_size"],
                                    st["seed"]),
                TensorDataset(*(t[:k] for t in seq.test.tensors)),
            )

        scores, s, m = timed(solve)
        scale = len(seq.test) / k
        rows[label] = Row(
            f"sequential {label} (per-test LiSSA, autograd products)", s * scale, m, scores=scores,
            note=f"timed on {k} test instances × {scale:.1f}",
        )
    return rows


def cosine(a: Tensor, b: Tensor) -> float:
    k = min(len(a), len(b))
    return nn.functional.cosine_similarity(a[:k].double(), b[:k].double(), dim=1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=927)
    parser.add_argument("--n-test", type=int, default=103)
    parser.add_argument("--sequential-tests", type=int, default=8, help="test instances timed for seq. LiSSA")
    parser.add_argument("--only", nargs="*", help="row labels to run (default: all)")
    args = parser.parse_args()

    model, train, test = make_problem(args.n_train, args.n_test)
    task = SupervisedTask("mse")
    plan = [(name, name, SETTINGS.get(name, {})) for name in available_estimators()] + EXTRA_ROWS
    if args.only:
        plan = [p for p in plan if p[0] in args.only]

    fitted: dict[str, Row] = {}
    for label, name, settings in plan:
        try:
            est = build_estimator(name, label=label, **settings)
            (run,) = run_estimators(model, task, train, test, [est], share_gradients=False, measure_memory=True)
            fitted[label] = Row(label, run.seconds, run.peak_memory, scores=run.scores, settings=run.settings)
        except Exception as err:  # noqa: BLE001 - reported in the table
            fitted[label] = Row(label, None, None, note=f"{type(err).__name__}: {str(err)[:120]}")
        print(f"done: {label}", flush=True)

    seq = Sequential(model, train, test)
    baseline = sequential_rows(seq, fitted, args)

    p = sum(p.numel() for p in model.parameters())
    print(f"\n{args.n_train} train × {args.n_test} test, MLP 8-128-128-1 (P = {p}), float32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"peak memory: {memory_kind(torch.device('cpu'))}\n")
    print("| estimator | seconds | peak MiB | sequential seconds | sequential peak MiB | speed-up "
          "| cosine vs sequential | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for label, row in fitted.items():
        base = baseline.get(label)
        mib = f"{row.peak_bytes / 2**20:.0f}" if row.peak_bytes is not None else "—"
        sec = f"{row.seconds:.2f}" if row.seconds is not None else "—"
        cells = ["—"] * 4
        if base is not None and row.seconds is not None:
            cells = [f"{base.seconds:.2f}", f"{base.peak_bytes / 2**20:.0f}", f"{base.seconds / row.seconds:.1f}x",
                     f"{cosine(row.scores, base.scores):.4f}"]
        notes = "; ".join(x for x in (row.note, base.note if base else "", _info(row)) if x)
        print(f"| {label} | {sec} | {mib} | " + " | ".join(cells) + f" | {notes} |")


def _info(row: Row) -> str:
    st = row.settings or {}
    bits = []
    if "damping" in st and isinstance(st["damping"], float):
        bits.append(f"λ={st['damping']:.3g}")
    if isinstance(st.get("solver"), dict):
        bits += [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in st["solver"].items()]
    return ", ".join(bits)


if __name__ == "__main__":
    main()
