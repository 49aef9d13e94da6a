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
from lightning_fimoda.further_training import FurtherTrainingLoop

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


def run_variant(variant: Variant, work_dir: Path, block: int | None = None) -> None:
    """Further training of ``variant`` (one seed block, or all) from its base run's final model; every
    block resumes from its run dir and is skipped when finished."""
    base_dir = work_dir / variant.name
    report = AttributionReport.load(base_dir / "fimoda")
    model, train, test, config = final_model(base_dir)
    loo = report.train_indices[: variant.m]
    tests = report.test_indices if variant.tests is None else report.test_indices[: variant.tests]
    batch_size = int(config["data"]["init_args"]["batch_size"])
    blocks = seed_blocks(variant)
    for seeds in blocks if block is None else [blocks[block]]:
        folder = variant_dir(work_dir, variant, seeds)
        if not (folder / GOLD_FILE).is_file():
            variant_loop(variant, seeds, len(train), batch_size, folder).run(model, train, test, loo, tests)


def blocks_done(work_dir: Path, variant: Variant) -> list[Path]:
    folders = [variant_dir(work_dir, variant, b) for b in seed_blocks(variant)]
    return [f for f in folders if (f / GOLD_FILE).is_file()]


def variant_done(work_dir: Path, variant: Variant) -> bool:
    return len(blocks_done(work_dir, variant)) == len(seed_blocks(variant))


def concatenate(golds: list[GoldStandard]) -> GoldStandard:
    """Gold standards of disjoint seed blocks of one job as one (seeds in block order)."""
    first = golds[0]
    seeds = [s for g in golds for s in g.seeds]
    full = None if first.full is None else torch.cat([g.full for g in golds])
    return replace(first, loo=torch.cat([g.loo for g in golds]), full=full, seeds=seeds,
                   config={**first.config, "seeds": seeds})


def load_variant(work_dir: Path, variant: Variant, base: AttributionReport) -> tuple[AttributionReport, float]:
    """The base run's estimator scores against the variant's gold standard (its finished seed blocks),
    and its further-training wall time in seconds (the sum over its units, as logged by the run store,
    across resumptions)."""
    folders = blocks_done(work_dir, variant)
    gold = concatenate([GoldStandard.load(f / GOLD_FILE) for f in folders])
    report = replace(base, gold=gold, seed_ks=seed_ks(len(gold.seeds)))
    seconds = 0.0
    for folder in folders:
        for line in (folder / "computed.log").read_text().splitlines():
            fields = dict(part.split("=", 1) for part in line.split())
            seconds += float(fields.get("seconds", 0.0))
    return report, seconds
