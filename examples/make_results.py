"""Regenerate ``docs/results.md``: the CPU experiments on Concrete, Energy, FICO HELOC and Adult.

Two parts (``examples/results/``):

1. *Base runs*: each ``examples/configs/<name>_cpu.yaml`` run exactly as ``fimoda run`` does (train the
   paper's MLP with a Lightning ``Trainer``; at the end of ``fit``, ``FiMODACallback`` runs every estimator
   and a short leave-one-out further-training gold standard), with data and output folders redirected.
2. *Paper protocol*: further gold standards from each base run's final model at the paper's horizons —
   both leave-out mechanisms (``subtract``, ``drop``), SGD and Adam, up to 100 seeds — on a subset of
   the scored instances (:data:`results.settings.VARIANTS` says which).

Then it writes ``docs/results.md`` (findings table first) and the PNG figures under ``docs/figures/``.
Every run lives in a stable folder under ``--work-dir`` and resumes after an interruption; nothing is
deleted. The markdown is regenerated entirely by this script (the sections "Horizon-matched influence"
and "Re-training from scratch", written by other scripts, are carried over verbatim).

    .venv/bin/python examples/make_results.py --data-dir ../shared/data    # about 90 minutes on 2 cores
    .venv/bin/python examples/make_results.py --quick --datasets concrete --out /tmp/docs   # smoke test
    .venv/bin/python examples/make_results.py --reuse   # only rewrite the markdown from finished runs
    .venv/bin/python examples/make_results.py --only energy_sgd_drop --no-markdown   # one part
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results.extras import LABEL, lissa_pair, run_lissa_paper  # noqa: E402
from results.markdown import write_markdown  # noqa: E402
from results.runs import (  # noqa: E402
    base_done,
    blocks_started,
    load_base,
    load_variant,
    run_base,
    run_variant,
    variant_done,
)
from results.settings import PAPER, ROOT, VARIANTS, fimoda_command, load_config  # noqa: E402

LISSA_PAPER = ("energy", "concrete")  # datasets where LiSSA also runs with the paper's settings (--only)


def run_all(args: argparse.Namespace) -> None:
    """Run whatever of the selected base runs and variants is not finished yet."""
    for name in args.datasets:
        run_dir = args.work_dir / name
        if not base_done(run_dir) and (not args.only or name in args.only):
            print(f"== {name}: {fimoda_command(name, args.data_dir)}", flush=True)
            timing = run_base(load_config(name, args.data_dir, args.work_dir, args.quick), run_dir)
            print(f"== {name}: {timing['total']:.0f} s", flush=True)
    for variant in selected_variants(args):
        parts = [p for p in args.only if p == variant.slug or p.startswith(f"{variant.slug}@")]
        if variant_done(args.work_dir, variant) or (args.only and not parts):
            continue
        if not base_done(args.work_dir / variant.name):
            print(f"== {variant.slug}: skipped, its base run is not finished", flush=True)
            continue
        for part in parts or [variant.slug]:
            block = int(part.split("@")[1]) if "@" in part else None
            print(f"== {part}: {variant}", flush=True)
            start = time.perf_counter()
            run_variant(variant, args.work_dir, block)
            print(f"== {part}: {time.perf_counter() - start:.0f} s", flush=True)
    for name in args.datasets:
        part = f"{name}_{LABEL}"
        if name in LISSA_PAPER and part in args.only and base_done(args.work_dir / name):
            print(f"== {part}: LiSSA with the paper's depth and scale ladder", flush=True)
            run = run_lissa_paper(args.work_dir / name)
            print(f"== {part}: {run.seconds:.0f} s, {run.error or 'ok'}", flush=True)


def selected_variants(args: argparse.Namespace) -> list:
    chosen = [v for v in VARIANTS if v.name in args.datasets]
    return [v.shrunk() for v in chosen] if args.quick else chosen


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"),
                        help="folder with concrete.csv, energy_efficiency.csv, heloc.csv, adult/")
    parser.add_argument("--datasets", nargs="+", default=list(PAPER), choices=list(PAPER))
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where results.md and figures/ go")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "fimoda_runs" / "results",
                        help="run folders (reports, gold standards, TensorBoard logs); resumed, never deleted")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test, not results")
    parser.add_argument("--reuse", action="store_true", help="rewrite the markdown from finished runs only")
    parser.add_argument("--only", nargs="+", default=[],
                        help="run only these parts: dataset names (base runs), <dataset>_<variant key> (all its seed "
                        "blocks) or <dataset>_<variant key>@<block> (seeds 20·block .. 20·block + 19), <dataset>_lissa_paper")
    parser.add_argument("--no-markdown", action="store_true", help="run, but do not write the markdown")
    args = parser.parse_args(argv)
    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--reuse"]

    if not args.reuse:
        run_all(args)
    if args.no_markdown:
        return None
    results = {name: load_base(args.work_dir / name) for name in args.datasets if base_done(args.work_dir / name)}
    variants = {}
    for variant in selected_variants(args):
        if variant.name in results and blocks_started(args.work_dir, variant):
            variants[variant.slug] = (variant, *load_variant(args.work_dir, variant, results[variant.name][0]))
    lissa = {}  # both LiSSAs against each gold standard of the datasets where the paper's LiSSA ran
    for key, report in [*((n, r) for n, (r, _, _) in results.items()), *((k, r) for k, (_, r, _) in variants.items())]:
        pair = lissa_pair(report, args.work_dir / key.split("_")[0])
        if pair is not None:
            lissa[key] = pair
    missing = [n for n in args.datasets if n not in results]
    missing += [v.slug for v in selected_variants(args) if v.slug not in variants]
    path = write_markdown(results, variants, lissa, missing, args.out, args.data_dir, args.quick, shown)
    print(f"Wrote {path}")
    return path


if __name__ == "__main__":
    main()
