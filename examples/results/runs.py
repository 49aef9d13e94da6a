"""Running and loading: the base runs (``fimoda run`` of a CPU configuration) and the variants' gold standards.

Everything is stored under ``<work_dir>/<name>/`` in stable folders, and nothing is deleted: an
interrupted base run trains its (deterministic) final model again and resumes its gold standard from
``fimoda/gold/<job id>/``; an interrupted variant resumes from ``<name>/<variant key>/`` (its units
of further training, :class:`~lightning_fimoda.further_training.FurtherTrainingLoop`'s ``run_dir``).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_fimoda import AttributionReport, GoldStandard
from lightning_fimoda._lightning import find_datasets
from lightning_fimoda.cli import FiMODACLI, fimoda_callback
from lightning_fimoda.exceptions import MismatchError
from lightning_fimoda.further_training import FurtherTrainingLoop
from lightning_fimoda.further_training.fingerprint import differences
from lightning_fimoda.further_training.store import RunStore

from .settings import Variant, seed_ks

TIMING_FILE = "timing.json"
MODEL_FILE = "final_model.pt"
GOLD_FILE = "gold_standard.safetensors"


# -- base runs ---------------------------------------------------------------------------------------
def run_base(config: dict[str, Any], run_dir: Path) -> dict[str, float]:
    """Train and attribute as ``fimoda run`` does, keep the final weights; returns wall times in seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when sys.argv holds other arguments
    try:
        cli = FiMODACLI(args=["--config", str(path)], run=False, save_config_kwargs={"overwrite": True})
    finally:
        sys.argv = argv
    callback = fimoda_callback(cli)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    torch.save(cli.model.state_dict(), run_dir / MODEL_FILE)
    total = time.perf_counter() - start
    report = callback.report
    gold = float(report.info.get("gold_standard_seconds", 0.0))
    estimators = sum(report.seconds.values())
    timing = {"total": total, "further_training": gold, "estimators": estimators,
              "training_and_overhead": total - gold - estimators}
    (run_dir / TIMING_FILE).write_text(json.dumps(timing, indent=1))
    return timing


def base_done(run_dir: Path) -> bool:
    return (run_dir / TIMING_FILE).is_file()


def load_base(run_dir: Path) -> tuple[AttributionReport, dict[str, Any], dict[str, float]]:
    report = AttributionReport.load(run_dir / "fimoda")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    timing = json.loads((run_dir / TIMING_FILE).read_text())
    return report, config, timing


# -- variants ------------------------------------------------------------------------------------------
def _instantiate(spec: dict[str, Any]) -> Any:
    module, _, cls = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), cls)(**spec.get("init_args", {}))


def final_model(run_dir: Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The base run's final model (eval mode), its training and test datasets, and its configuration."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = _instantiate(config["model"])
    model.load_state_dict(torch.load(run_dir / MODEL_FILE, weights_only=True))
    model.eval()
    datamodule = _instantiate(config["data"])
    datamodule.prepare_data()
    datamodule.setup("fit")
    train, test = find_datasets(None, datamodule, None, None)
    return model, train, test, config


SEED_BLOCK = 20  # a variant with more seeds runs in blocks of 20 (separate run dirs: parallel, partial)


def seed_blocks(variant: Variant) -> list[list[int]]:
    """The variant's seeds ``0..S-1`` in blocks of :data:`SEED_BLOCK`."""
    return [list(range(a, min(a + SEED_BLOCK, variant.seeds))) for a in range(0, variant.seeds, SEED_BLOCK)]


def variant_dir(work_dir: Path, variant: Variant, block: list[int]) -> Path:
    """``<name>/<key>`` for a single block, ``<name>/<key>_seeds_<first>-<last>`` otherwise."""
    if len(seed_blocks(variant)) == 1:
        return work_dir / variant.name / variant.key
    return work_dir / variant.name / f"{variant.key}_seeds_{block[0]}-{block[-1]}"


def variant_loop(variant: Variant, seeds: list[int], n_train: int, batch_size: int, run_dir: Path) -> FurtherTrainingLoop:
    """The further-training loop of ``variant``: checkpoints every ``variant.every`` epochs (in steps)."""
    every = variant.every * math.ceil(n_train / batch_size)
    return FurtherTrainingLoop(
        optimizer=variant.optimizer, lr=variant.lr, epochs=variant.epochs, batch_size=batch_size,
        seeds=seeds, leave_out=variant.leave_out, eval_every=every, adjustments=("mean", "full"),
        run_dir=run_dir, progress=False,
    )


def _job(variant: Variant, work_dir: Path) -> tuple[Any, ...]:
    """``(model, train, test, loo_indices, test_indices, batch_size)`` of the variant's further training."""
    base_dir = work_dir / variant.name
    report = AttributionReport.load(base_dir / "fimoda")
    model, train, test, config = final_model(base_dir)
    loo = report.train_indices[: variant.m]
    tests = report.test_indices if variant.tests is None else report.test_indices[: variant.tests]
    return model, train, test, loo, tests, int(config["data"]["init_args"]["batch_size"])


def run_variant(variant: Variant, work_dir: Path, block: int | None = None) -> None:
    """Further training of ``variant`` (one seed block, or all) from its base run's final model; every
    block resumes from its run dir and is skipped when finished."""
    model, train, test, loo, tests, batch_size = _job(variant, work_dir)
    blocks = seed_blocks(variant)
    for seeds in blocks if block is None else [blocks[block]]:
        folder = variant_dir(work_dir, variant, seeds)
        if not (folder / GOLD_FILE).is_file():
            variant_loop(variant, seeds, len(train), batch_size, folder).run(model, train, test, loo, tests)


def blocks_started(work_dir: Path, variant: Variant) -> list[tuple[list[int], Path]]:
    """The seed blocks with at least one finished unit (a finished block has its gold standard file)."""
    pairs = [(b, variant_dir(work_dir, variant, b)) for b in seed_blocks(variant)]
    return [(b, f) for b, f in pairs if (f / GOLD_FILE).is_file() or any((f / "units").glob("seed*.safetensors"))]


def variant_done(work_dir: Path, variant: Variant) -> bool:
    return all((variant_dir(work_dir, variant, b) / GOLD_FILE).is_file() for b in seed_blocks(variant))


def partial_gold(variant: Variant, seeds: list[int], folder: Path, job: tuple[Any, ...]) -> GoldStandard:
    """The gold standard of the seeds of an unfinished block whose units are stored (checked to be this
    job's, as a resumed run would)."""
    model, train, test, loo, tests, batch_size = job
    plan = variant_loop(variant, seeds, len(train), batch_size, None).plan(model, train, test, loo, tests)
    store = RunStore(folder)
    stored = store.read_config()
    if differences(stored["fingerprint"], plan.fingerprint):
        raise MismatchError(f"{folder} holds another job: {differences(stored['fingerprint'], plan.fingerprint)}")
    store.job_id = stored["fingerprint_id"]
    done = [s for s in seeds if store.has(s, 0)]
    part = variant_loop(variant, done, len(train), batch_size, None).plan(model, train, test, loo, tests)
    if any(u[1] != 0 for u in part.units()):
        raise MismatchError(f"{folder}: partial loading expects one chunk per seed.")
    return part.assemble({(s, 0): store.load(s, 0) for s in done})


def concatenate(golds: list[GoldStandard]) -> GoldStandard:
    """Gold standards of disjoint seed blocks of one job as one (seeds in block order)."""
    first = golds[0]
    seeds = [s for g in golds for s in g.seeds]
    full = None if first.full is None else torch.cat([g.full for g in golds])
    return replace(first, loo=torch.cat([g.loo for g in golds]), full=full, seeds=seeds,
                   config={**first.config, "seeds": seeds})


def load_variant(work_dir: Path, variant: Variant, base: AttributionReport) -> tuple[AttributionReport, float]:
    """The base run's estimator scores against the variant's gold standard (every finished unit of its
    seed blocks), and its further-training wall time in seconds (the sum over its units, as logged by
    the run store, across resumptions)."""
    started = blocks_started(work_dir, variant)
    job = None
    golds = []
    for seeds, folder in started:
        if (folder / GOLD_FILE).is_file():
            golds.append(GoldStandard.load(folder / GOLD_FILE))
            continue
        job = job or _job(variant, work_dir)
        golds.append(partial_gold(variant, seeds, folder, job))
    gold = concatenate(golds)
    report = replace(base, gold=gold, seed_ks=seed_ks(len(gold.seeds)))
    seconds = 0.0
    for _, folder in started:
        for line in (folder / "computed.log").read_text().splitlines():
            fields = dict(part.split("=", 1) for part in line.split())
            seconds += float(fields.get("seconds", 0.0))
    return report, seconds
