"""Markdown tables and number formatting for ``docs/results.md``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lightning_fimoda import AttributionReport

from .settings import PAPER, Variant

At = Callable[[int], str]  # checkpoint position -> "epoch 5"


def pm(mean: float, sem: float) -> str:
    return f"{mean:.3f} ± {sem:.3f}" if not math.isnan(sem) else f"{mean:.3f}"


def table(head: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "|".join(["---"] + ["---:"] * (len(head) - 1))
    return ["| " + " | ".join(head) + " |", f"|{align}|", *["| " + " | ".join(r) + " |" for r in rows]]


def base_at(report: AttributionReport) -> At:
    gold = report.require_gold()
    return lambda i: f"{gold.checkpoint_unit} {gold.checkpoints[i]}"


def variant_at(report: AttributionReport, variant: Variant) -> At:
    """Checkpoints of a variant are step counts, ``every`` epochs apart: shown as epochs."""
    gold = report.require_gold()
    per_epoch = gold.checkpoints[0] // variant.every
    return lambda i: f"epoch {gold.checkpoints[i] // per_epoch}"


def agreement_rows(report: AttributionReport, adjust: str, at: At, seconds: bool = True) -> list[list[str]]:
    """Per estimator: peak cosine (and where), final cosine, peak Spearman (and where)[, time]; then the
    noise ceiling."""
    rows = []
    for label in report.labels:
        cos, spear = report.agreement(label, adjust, "cosine"), report.agreement(label, adjust, "spearman")
        (i, pc, pcs), (j, ps, pss) = cos.peak(), spear.peak()
        row = [label, pm(pc, pcs), at(i), pm(float(cos.mean[-1]), float(cos.sem[-1])), pm(ps, pss), at(j)]
        rows.append(row + ([f"{report.seconds[label]:.1f}"] if seconds else []))
    ceiling = report.noise_ceiling(adjust, "cosine")
    if ceiling is not None:
        i, mean, sem = ceiling.peak()
        j, smean, ssem = report.noise_ceiling(adjust, "spearman").peak()
        row = ["*noise ceiling*", pm(mean, sem), at(i), pm(float(ceiling.mean[-1]), float(ceiling.sem[-1])),
               pm(smean, ssem), at(j)]
        rows.append(row + ([""] if seconds else []))
    return rows


AGREEMENT_HEAD = ["estimator", "peak cosine", "at", "final cosine", "peak Spearman", "at"]


def seed_rows(report: AttributionReport, adjust: str) -> list[list[str]]:
    """Per estimator: peak cosine with gold standards averaging k seeds, for every k of the report."""
    rows = []
    for label in report.labels:
        curves = report.seed_averaging(label, adjust, "cosine")
        rows.append([label, *[pm(*curves[k].peak()[1:]) for k in report.seed_ks]])
    return rows


def seed_gain(report: AttributionReport, label: str, adjust: str = "mean") -> tuple[float, float]:
    """Peak cosine with single-seed gold standards and with all seeds averaged."""
    curves = report.seed_averaging(label, adjust, "cosine")
    ks = report.seed_ks
    return curves[ks[0]].peak()[1], curves[ks[-1]].peak()[1]


def lr_text(lr: float) -> str:
    return f"{lr:g}"


def settings_row(name: str, report: AttributionReport, config: dict[str, Any]) -> list[str]:
    """The base run's settings beside the paper's."""
    paper = PAPER[name]
    gold = config["fimoda"]["gold"]
    model = config["model"]["init_args"]
    final = f"SGD lr {lr_text(model['lr'])}, {config['trainer']['max_epochs']} epochs, batch " \
            f"{config['data']['init_args']['batch_size']}"
    length = f"{gold['epochs']} epochs" if "epochs" in gold else f"{gold['steps']} steps"
    every = "every epoch" if gold.get("eval_every", "epoch") == "epoch" else f"every {gold['eval_every']} steps"
    further = f"{gold['optimizer'].upper()} lr {lr_text(gold['lr'])}, {length}, batch {gold['batch_size']}, " \
              f"subtract, evaluated {every}"
    n_train, n_test = report.info["train_dataset_size"], report.info["test_dataset_size"]
    return [
        paper["title"], f"{n_train} / {n_test}", f"{final} (paper: {paper['final']})",
        f"{further} (paper: {paper['further']})", f"{len(report.gold.seeds)} ({paper['seeds']})",
        f"{report.gold.loo_indices.numel()} ({paper['m']})",
        f"{report.gold.test_indices.numel()} ({paper['tests']})",
    ]


def variant_row(variant: Variant, report: AttributionReport, seconds: float) -> list[str]:
    """A variant's settings, what it reduced, its wall time and the cost of the paper's full protocol."""
    gold = report.require_gold()
    paper = PAPER[variant.name]
    runs = len(gold.seeds) * (gold.loo_indices.numel() + 1)
    full_runs = paper["seeds"] * (paper["m"] + 1)
    full_cost = seconds * full_runs / runs
    return [
        f"`{variant.slug}`", f"{variant.optimizer.upper()} lr {lr_text(variant.lr)}", variant.leave_out,
        f"{variant.epochs} (every {variant.every})", f"{len(gold.seeds)}", f"{gold.loo_indices.numel()}",
        f"{gold.test_indices.numel()}", f"{seconds / 60:.1f} ({runs} runs)",
        f"{1000 * seconds / (runs * variant.epochs):.1f}", f"≈ {full_cost / 3600:.1f} h",
    ]


VARIANT_HEAD = ["variant", "further training", "leave-out", "epochs (checkpoints)", "seeds", "LOO m",
                "tests", "wall time, min", "ms per run and epoch", "paper's S = 100, m = 100 would take"]
