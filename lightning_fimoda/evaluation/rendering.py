"""Rendering an :class:`~lightning_fimoda.AttributionReport` as text: the console table, Markdown
(``report.md``) and the texts sent to TensorBoard. The report itself is data; this is its only view.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from .metrics import METHODS

if TYPE_CHECKING:
    from .report import AttributionReport

__all__ = ["console_table", "markdown", "top_k_table"]


def _fmt(mean: float, sem: float) -> str:
    return f"{mean:.3f} ± {sem:.3f}" if not math.isnan(sem) else f"{mean:.3f}"


def top_k_table(report: AttributionReport, label: str, k: int = 5, max_tests: int = 5) -> list[str]:
    """Markdown table lines: the ``k`` most helpful / harmful training instances of the first tests."""
    top = report.top_k(label, k)
    lines = ["| test | most helpful (index: score) | most harmful (index: score) |", "|---:|---|---|"]
    for t in range(min(max_tests, report.test_indices.numel())):
        helpful = ", ".join(f"{int(i)}: {float(s):.3g}" for i, s in zip(top.helpful_indices[t], top.helpful_scores[t]))
        harmful = ", ".join(f"{int(i)}: {float(s):.3g}" for i, s in zip(top.harmful_indices[t], top.harmful_scores[t]))
        lines.append(f"| {int(report.test_indices[t])} | {helpful} | {harmful} |")
    return lines


def console_table(report: AttributionReport, adjust: str = "mean") -> str:
    """A fixed-width table of agreement and cost per estimator; failed estimators are listed below it."""
    gold = report.gold
    unit = gold.checkpoint_unit if gold is not None else "checkpoint"
    head = ["estimator"] + (["peak cosine", unit, "peak Spearman", unit] if gold is not None else [])
    head += ["time (s)", "memory (MiB)"]
    body = []
    for row in report.table(adjust):
        line = [row["estimator"] + (" *" if row["estimator"] in report.horizon_matched else "")]
        if gold is not None:
            for method in METHODS:
                mean, sem, at = row[f"peak_{method}"]
                line += [_fmt(mean, sem), str(at)]
        body.append([*line, f"{row['seconds']:.2f}", f"{row['peak_memory_mib']:.1f}"])
    if gold is not None:
        ceiling = report.noise_ceiling(adjust, "cosine")
        if ceiling is not None:
            i, mean, sem = ceiling.peak()
            body.append(["noise ceiling", _fmt(mean, sem), str(gold.checkpoints[i]), "", "", "", ""])
    widths = [max(len(r[c]) for r in [head, *body]) for c in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]]
    title = "Attribution vs further training" if gold is not None else "Attribution"
    if gold is not None:
        title += f" ({adjust} adjustment, mean ± s.e. over {gold.test_indices.numel()} tests)"
    out = [title, lines[0], "-" * len(lines[0]), *lines[1:]]
    if report.horizon_matched:
        out.append("* horizon-matched: compared with the gold standard at the same checkpoint")
    out += [f"FAILED {label}: {error}" for label, error in report.failed.items()]
    return "\n".join(out)


def markdown(report: AttributionReport, top_k: int = 5, max_tests: int = 5) -> str:
    """The report as Markdown: agreement tables, seed averaging, top examples, settings, versions."""
    out = ["# Attribution report", ""]
    out += [f"- {k.replace('_', ' ')}: {v}" for k, v in report.info.items() if k != "versions"]
    out.append(f"- scored: {report.train_indices.numel()} training × {report.test_indices.numel()} test instances")
    out.append(f"- peak memory: {report.memory_kind or 'not measured'}")
    out.append("- sign: positive = the training instance helps the test instance (SPEC §1)")
    if report.horizon_matched:
        out.append(
            f"- horizon-matched (checkpoint-indexed) estimators: {', '.join(report.horizon_matched)} — each is "
            "compared with the gold standard at the same checkpoint; its top examples, mislabel AUC and sorted "
            "scores use its last checkpoint"
        )
    out += _failed(report)
    if report.gold is not None:
        out += _gold_sections(report)
    else:
        out += ["", "## Cost", "", "| estimator | time (s) | peak memory (MiB) |", "|---|---:|---:|"]
        out += [f"| {r['estimator']} | {r['seconds']:.2f} | {r['peak_memory_mib']:.1f} |" for r in report.table()]
    if report.mislabeled is not None and report.labels:
        out += ["", f"## Mislabel detection ({int(report.mislabeled.sum())} flipped of "
                f"{report.mislabeled.numel()}; AUC-ROC of −Σ_tests score)", "", "| estimator | AUC |", "|---|---:|"]
        out += [f"| {label} | {report.mislabel_auc(label):.3f} |" for label in report.labels]
    out += _top_sections(report, top_k, max_tests)
    out += ["", "## Estimator settings", ""]
    out += [f"- **{r.label}**: `{json.dumps(r.settings, sort_keys=True)}`" for r in report.runs]
    versions = report.info.get("versions", {})
    if versions:
        out += ["", "## Library versions", "", ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(out) + "\n"


def _failed(report: AttributionReport) -> list[str]:
    if not report.failed:
        return []
    out = ["", "## Failed estimators", "", "The other estimators' results and the gold standard are complete.", ""]
    return out + [f"- **{label}**: `{error}`" for label, error in report.failed.items()]


def _agreement_table(report: AttributionReport, adjust: str) -> list[str]:
    gold = report.require_gold()
    unit = gold.checkpoint_unit
    out = [
        f"| estimator | peak cosine | at {unit} | final cosine | peak Spearman | at {unit} "
        "| time (s) | peak memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.table(adjust):
        pc, fc, ps = r["peak_cosine"], r["final_cosine"], r["peak_spearman"]
        out.append(
            f"| {r['estimator']} | {_fmt(pc[0], pc[1])} | {pc[2]} | {_fmt(*fc)} | {_fmt(ps[0], ps[1])} "
            f"| {ps[2]} | {r['seconds']:.2f} | {r['peak_memory_mib']:.1f} |"
        )
    ceilings = [report.noise_ceiling(adjust, m) for m in METHODS]
    if ceilings[0] is not None:
        (ic, mc, sc), (is_, ms, ss) = (c.peak() for c in ceilings)
        final = ceilings[0]
        out.append(
            f"| *noise ceiling (split-half)* | {_fmt(mc, sc)} | {gold.checkpoints[ic]} "
            f"| {_fmt(float(final.mean[-1]), float(final.sem[-1]))} | {_fmt(ms, ss)} "
            f"| {gold.checkpoints[is_]} | | |"
        )
    return out


def _gold_sections(report: AttributionReport) -> list[str]:
    gold = report.require_gold()
    unit = gold.checkpoint_unit
    out = [f"- gold standard: {gold!r}", f"- checkpoints ({unit}s): {', '.join(str(c) for c in gold.checkpoints)}"]
    for adjust in gold.adjustments:
        out += ["", f"## Agreement with further training ({adjust} adjustment)", "",
                f"Mean ± standard error over {gold.test_indices.numel()} test instances; peak over {unit}s.", ""]
        out += _agreement_table(report, adjust)
        out += ["", f"### Seed averaging ({adjust} adjustment): peak cosine with groups of k seeds", ""]
        out.append("| estimator | " + " | ".join(f"k = {k}" for k in report.seed_ks) + " |")
        out.append("|---|" + "---:|" * len(report.seed_ks))
        for label in report.labels:
            curves = report.seed_averaging(label, adjust)
            out.append(f"| {label} | " + " | ".join(_fmt(*curves[k].peak()[1:]) for k in report.seed_ks) + " |")
    return out


def _top_sections(report: AttributionReport, k: int, max_tests: int) -> list[str]:
    if not report.labels:
        return []
    shown = min(max_tests, report.test_indices.numel())
    out = ["", f"## Most helpful / most harmful training instances (first {shown} test instances, k = "
           f"{min(k, report.train_indices.numel())})", ""]
    for label in report.labels:
        out += [f"**{label}**", "", *top_k_table(report, label, k, max_tests), ""]
    return out[:-1]
