"""The paper's findings, one row each: the paper's claim, our number, holds / partly / does not hold, why.

Rules (stated in the document): a curve *decays* when its last value is more than 0.02 below its peak,
and peaks *early* when the peak lies in the first quarter of the checkpoints; seed averaging *raises*
an estimator's agreement when its peak with all seeds averaged exceeds its peak with single seeds by
more than 0.005; a curve is *noisier* when its mean absolute change between checkpoints is larger.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_fimoda import AttributionReport

from .settings import ADJUST, FIRST_ORDER, PAPER, POOR, SECOND_ORDER, Variant
from .tables import seed_gain, variant_at

Variants = dict[str, tuple[Variant, AttributionReport, float]]
RETRAINING = "[Re-training from scratch (Energy)](#re-training-from-scratch-energy)"


def verdict(flags: list[bool]) -> str:
    if not flags:
        return "not measured"
    return "holds" if all(flags) else ("partly" if any(flags) else "does not hold")


def mechanism_gain(report: AttributionReport) -> float:
    """Mean over estimators of the rise of the peak cosine from single seeds to all seeds averaged."""
    gains = [hi - lo for lo, hi in (seed_gain(report, label) for label in report.labels)]
    return sum(gains) / len(gains)


def primary_mechanism(variants: Variants) -> str:
    """The leave-out mechanism under which seed averaging raises agreement most (SGD, the paper's horizon)."""
    gains: dict[str, list[float]] = {}
    for variant, report, _ in variants.values():
        if variant.optimizer == "sgd":
            gains.setdefault(variant.leave_out, []).append(mechanism_gain(report))
    if not gains:
        return "subtract"
    return max(gains, key=lambda k: sum(gains[k]) / len(gains[k]))


def sgd_reports(variants: Variants, mechanism: str, optimizer: str = "sgd") -> list[tuple[Variant, AttributionReport]]:
    return [(v, r) for v, r, _ in variants.values() if v.optimizer == optimizer and v.leave_out == mechanism]


def _curve(report: AttributionReport, label: str, adjust: str = ADJUST) -> list[float]:
    return [float(v) for v in report.agreement(label, adjust, "cosine").mean]


def first_order(pairs: list[tuple[Variant, AttributionReport]]) -> tuple[str, str]:
    """Grad-Dot and DataInf: where they peak, how far they fall by the last checkpoint."""
    parts, flags = [], []
    for variant, report in pairs:
        at = variant_at(report, variant)
        for label in ("grad_dot", "datainf"):
            if label not in report.labels:
                continue
            values = _curve(report, label)
            i = max(range(len(values)), key=values.__getitem__)
            flags.append(values[i] - values[-1] > 0.02 and i <= len(values) // 4)
            parts.append(f"{variant.title} {label} {values[i]:.3f} at {at(i)} → "
                         f"{values[-1]:.3f} at {at(len(values) - 1)}")
    return "; ".join(parts), verdict(flags)


def second_order(pairs: list[tuple[Variant, AttributionReport]]) -> tuple[str, str]:
    """CG / LiSSA: below Grad-Dot at the first checkpoint, and falling less than it."""
    parts, flags = [], []
    for variant, report in pairs:
        if "grad_dot" not in report.labels:
            continue
        gd = _curve(report, "grad_dot")
        for label in (x for x in SECOND_ORDER if x in report.labels):
            values = _curve(report, label)
            flags.append(values[0] < gd[0] and max(values) - values[-1] <= max(0.02, max(gd) - gd[-1]))
            parts.append(f"{variant.title} {label} first {values[0]:.3f} (Grad-Dot {gd[0]:.3f}), "
                         f"peak {max(values):.3f}, last {values[-1]:.3f} (Grad-Dot {gd[-1]:.3f})")
    return "; ".join(parts), verdict(flags)


def poor(pairs: list[tuple[Variant, AttributionReport]], failed: dict[str, str]) -> tuple[str, str]:
    """LiSSA-H and TRAK (M = 1): peaks below every other estimator's."""
    parts, flags = [], []
    for variant, report in pairs:
        peaks = {label: report.agreement(label, ADJUST, "cosine").peak()[1] for label in report.labels}
        others = [v for k, v in peaks.items() if k not in POOR]
        for label in POOR:
            if label in peaks:
                flags.append(peaks[label] < min(others))
                parts.append(f"{variant.title} {label} {peaks[label]:.3f} (others "
                             f"{min(others):.3f}–{max(others):.3f})")
    parts += [f"{PAPER[name]['title']} lissa_h refused: H + λI not positive definite" for name in failed]
    return "; ".join(parts), verdict(flags)


def seeds(variants: Variants, mechanism: str) -> tuple[str, str]:
    """Peak cosine with single-seed gold standards → all seeds averaged, per estimator (SGD)."""
    parts, flags = [], []
    for variant, report in sgd_reports(variants, mechanism):
        gains = {label: seed_gain(report, label) for label in report.labels}
        flags += [hi - lo > 0.005 for lo, hi in gains.values()]
        shown = ", ".join(f"{k} {lo:.3f} → {hi:.3f}" for k, (lo, hi) in gains.items() if k in FIRST_ORDER + SECOND_ORDER)
        parts.append(f"{variant.title} (k = 1 → {len(report.gold.seeds)}): {shown}")
    return "; ".join(parts), verdict(flags)


def roughness(report: AttributionReport, label: str, adjust: str) -> float:
    values = torch.tensor(_curve(report, label, adjust))
    return float(values.diff().abs().mean()) if values.numel() > 1 else 0.0


def full_vs_mean(pairs: list[tuple[Variant, AttributionReport]]) -> tuple[str, str]:
    """Mean absolute change of Grad-Dot's cosine between checkpoints, `full` vs `mean` adjustment."""
    parts, flags = [], []
    for variant, report in pairs:
        if "full" not in report.gold.adjustments:
            continue
        full, mean = roughness(report, "grad_dot", "full"), roughness(report, "grad_dot", "mean")
        flags.append(full > mean)
        parts.append(f"{variant.title} {full:.4f} vs {mean:.4f}")
    some = [any(flags)] if flags else []
    return "; ".join(parts), verdict(some)


def datainf_like_grad_dot(results: dict[str, Any]) -> tuple[str, str]:
    """Mean over test instances of the cosine between DataInf's and Grad-Dot's score vectors."""
    parts, flags = [], []
    for name, (report, _, _) in results.items():
        if not {"datainf", "grad_dot"} <= set(report.labels):
            continue
        a, b = report.scores["datainf"], report.scores["grad_dot"]
        cos = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
        flags.append(cos > 0.9)
        parts.append(f"{PAPER[name]['title']} {cos:.3f}")
    return "; ".join(parts), verdict(flags)
