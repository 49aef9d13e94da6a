"""Side by side with the peer libraries (issue 17): same problems, interleaved runs, one table.

    make bench-peers                       # creates .venv-bench with the peers, then runs this
    .venv-bench/bin/python -m benchmarks.peers [--quick] [--problems concrete cifar] [--repeats 3]

Per method and peer: median wall time ratio (peer / ours; > 1 means we are faster), peak memory of
both (:class:`~lightning_fimoda.profiling.PeakMemory`: RSS above the start level, sampled every 2 ms),
and the mean cosine between score rows after mapping the peer's output onto SPEC §1 (each mapping is
stated next to the call in ``peer_*.py``). Rows a peer cannot express carry the reason instead.
Same model, data, damping and solver settings for every library (see ``problems.py``).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import time
from dataclasses import replace

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's per-batch progress bars (read when tqdm loads)

import torch  # noqa: E402

from . import ours, peer_captum, peer_dattri, peer_kronfluence, peer_pydvl, problems  # noqa: E402
from .harness import Row, markdown, measure  # noqa: E402

PEERS = {"dattri": peer_dattri, "pyDVL": peer_pydvl, "captum": peer_captum, "kronfluence": peer_kronfluence}
DISTRIBUTIONS = {"dattri": "dattri", "pyDVL": "pydvl", "captum": "captum", "kronfluence": "kronfluence"}
# Which peer has which method (issue 17's list); anything else is not offered and gets no row.
OFFERED = {
    "grad_dot": ["dattri", "captum", "kronfluence"],
    "grad_dot (Linear/Conv2d params)": ["kronfluence"],  # equal work where kronfluence skips layers
    "grad_cos": ["dattri"],
    **{f"{m} ({h})": ["dattri", "pyDVL"] for m in ("explicit", "cg", "lissa") for h in ("exact", "GN")},
    "lissa (exact, full batch)": ["dattri", "pyDVL"],
    "arnoldi (exact)": ["dattri", "pyDVL", "captum"],
    "datainf": ["dattri", "pyDVL"],
    "ekfac": ["dattri", "pyDVL"],
    "trak": ["dattri"],
}

# Where the mathematics differs for every peer of a method (stated in the table's note column).
METHOD_NOTES = {
    "trak": "different random projections (same dimension)",
}


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def method_rows(p: problems.Problem, method: str, repeats: int, deadline: float) -> list[Row]:
    peers, reasons, notes = {}, {}, {}
    k = p.settings.get("tests_for", {}).get(method)
    p = p.with_tests(k) if k and k < len(p.test) else p
    factor = p.settings.get("damping_for", {}).get(method)  # e.g. LiSSA (exact) needs H + λI ≻ 0
    p = replace(p, damping=factor * p.lambda_g) if factor else p
    for name in OFFERED[method]:
        mod = PEERS[name]
        if method.startswith("grad_dot (") and "tracked_params" not in p.settings:
            reasons[name] = "same as grad_dot: kronfluence tracks every layer of this model"
        elif _version(DISTRIBUTIONS[name]) == "not installed":
            reasons[name] = f"{name} not installed (make bench-peers installs it)"
        elif method in getattr(mod, "UNSUPPORTED", {}):
            reasons[name] = mod.UNSUPPORTED[method]
        elif method in mod.RUNNERS:
            peers[name] = (lambda fn: lambda: fn(p))(mod.RUNNERS[method])
            notes[name] = getattr(mod, "NOTES", {}).get(method, METHOD_NOTES.get(method, ""))
        else:
            reasons[name] = f"not offered by {name}"
    if time.monotonic() > deadline:
        reasons.update({k: "skipped: over this run's time budget (--budget)" for k in peers})
        peers = {}
    rows = measure(p.name, method, ours.runner(p, method), peers, repeats, notes) if peers else []
    rows += [Row(p.name, method, name, reason=why) for name, why in reasons.items()]
    tags = ([f"{len(p.test)} tests"] if k else []) + ([f"λ = {factor:g}·λ_G"] if factor else [])
    for r in rows:
        r.method = f"{method} [{', '.join(tags)}]" if tags else method
    order = OFFERED[method]
    return sorted(rows, key=lambda r: order.index(r.peer))


def make_problem(name: str, args: argparse.Namespace) -> problems.Problem:
    if name == "cifar":
        return problems.cifar(args.quick, args.cifar_train, args.cifar_test)
    return problems.concrete(args.quick)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny problems, 2 repeats: a smoke run")
    ap.add_argument("--problems", nargs="+", default=["concrete", "cifar"], choices=["concrete", "cifar"])
    ap.add_argument("--methods", nargs="+", default=list(OFFERED), choices=list(OFFERED))
    ap.add_argument("--repeats", type=int, default=None, help="runs per library (default 3; --quick 2)")
    ap.add_argument("--cifar-train", type=int, default=2000, help="CIFAR-10 training images")
    ap.add_argument("--cifar-test", type=int, default=20, help="CIFAR-10 test images")
    ap.add_argument("--budget", type=float, default=900.0, help="seconds; later rows are skipped")
    args = ap.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    deadline = time.monotonic() + args.budget
    print(f"torch {torch.__version__}, threads torch.get_num_threads()={torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), repeats={repeats}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    print("peers: " + ", ".join(f"{k} {_version(v)}" for k, v in DISTRIBUTIONS.items()))
    print("load average (1, 5, 15 min) at the start: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    rows: list[Row] = []
    for name in args.problems:
        p = make_problem(name, args)
        print(f"\n{name}: {len(p.train)} train x {len(p.test)} test, {p.n_params} parameters, {p.loss_kind}; "
              f"{p.note}; λ_G={p.lambda_g:.3g}, damping λ={p.damping:.3g}")
        for method in args.methods:
            new = method_rows(p, method, repeats, deadline)
            for r in new:
                print(" | ".join(r.cells()), flush=True)
            rows += new
    print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    print("\n" + markdown(rows))


if __name__ == "__main__":
    main()
