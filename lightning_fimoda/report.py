"""``AttributionReport``: everything one attribution run produced, its evaluation, and its persistence.

A report holds the estimators' scores ``[T, N]`` (``T`` test instances × ``N`` scored training
instances, SPEC §1 sign), their cost (seconds, peak memory, see :mod:`~lightning_fimoda.profiling`),
their settings (constructor arguments plus values chosen while fitting, e.g. the damping used), and
optionally the further-training :class:`~lightning_fimoda.GoldStandard`. The evaluation against the
gold standard (SPEC §4: agreement curves per checkpoint, peaks, seed averaging, noise ceiling,
mislabel AUC) is derived from those tensors on demand with :mod:`lightning_fimoda.metrics`, so a
loaded report evaluates to exactly the same numbers.

On disk (``save(dir)``): ``scores.safetensors`` (scores and indices), ``gold_standard.safetensors``
(when there is one), ``report.json`` (every other field) and ``report.md`` (:meth:`to_markdown`).
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._files import atomic_write
from .gold_standard import GoldStandard
from .metrics import (
    METHODS,
    Agreement,
    agreement,
    mislabel_auroc,
    noise_ceiling,
    seed_averaging,
    top_k_examples,
)

__all__ = ["AttributionReport", "library_versions"]

SCORES_FILE = "scores.safetensors"
GOLD_FILE = "gold_standard.safetensors"
META_FILE = "report.json"
MARKDOWN_FILE = "report.md"
FORMAT_VERSION = 1
_VERSIONED = ("torch", "lightning", "torchmetrics", "numpy", "lightning-fimoda", "kronfluence", "traker")


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that produce the numbers."""
    out = {"python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (tuples → lists, tensors → numbers/lists, other objects → ``repr``)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return repr(value)



def _fmt(mean: float, sem: float) -> str:
    return f"{mean:.3f} ± {sem:.3f}" if not math.isnan(sem) else f"{mean:.3f}"


@dataclass(eq=False)
class AttributionReport:
    """Scores, cost and settings per estimator, the gold standard, and their evaluation.

    Attributes:
        scores: ``{label: [T, N]}`` attribution scores, in estimator order.
        train_indices: ``[N]`` training-set indices of the score columns.
        test_indices: ``[T]`` test-set indices of the score rows.
        gold: the further-training gold standard over ``gold.test_indices × gold.loo_indices`` (both
            contained in the indices above), or ``None``.
        seconds: wall time per estimator.
        peak_memory: peak memory per estimator in bytes, measured as :attr:`memory_kind` says.
        memory_kind: how peak memory was measured.
        settings: per estimator, its settings (JSON types).
        mislabeled: ``[N]`` bool, which scored training instances had their labels flipped, or ``None``.
        seed_ks: group sizes ``k`` for seed averaging (default: 1, 2, 4, ... and the number of seeds).
        info: facts about the run (model, task, dataset sizes, gold-standard time, library versions).
    """

    scores: dict[str, Tensor]
    train_indices: Tensor
    test_indices: Tensor
    gold: GoldStandard | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)
    memory_kind: str = ""
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    mislabeled: Tensor | None = None
    seed_ks: list[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.scores:
            raise ValueError("AttributionReport needs the scores of at least one estimator.")
        self.train_indices = torch.as_tensor(self.train_indices).reshape(-1).long()
        self.test_indices = torch.as_tensor(self.test_indices).reshape(-1).long()
        expected = (self.test_indices.numel(), self.train_indices.numel())
        for label, s in self.scores.items():
            if tuple(s.shape) != expected:
                raise ValueError(f"Scores of {label!r} have shape {tuple(s.shape)}, expected {expected}.")
        if self.mislabeled is not None:
            self.mislabeled = torch.as_tensor(self.mislabeled).reshape(-1).bool()
            if self.mislabeled.numel() != expected[1]:
                raise ValueError(f"mislabeled has {self.mislabeled.numel()} flags for {expected[1]} columns.")
        self.settings = jsonable(self.settings)
        self.info = jsonable(self.info)
        self.seconds = {k: float(v) for k, v in self.seconds.items()}
        self.peak_memory = {k: int(v) for k, v in self.peak_memory.items()}
        if self.gold is not None:
            self._columns = _positions(self.train_indices, self.gold.loo_indices, "LOO (training)")
            self._rows = _positions(self.test_indices, self.gold.test_indices, "test")
            if self.seed_ks is None:
                num = len(self.gold.seeds)
                self.seed_ks = sorted({2**i for i in range(num.bit_length())} | {num})
            self.seed_ks = [int(k) for k in self.seed_ks]
            bad = [k for k in self.seed_ks if not 1 <= k <= len(self.gold.seeds)]
            if bad:
                raise ValueError(f"seed_ks {bad} not between 1 and the {len(self.gold.seeds)} seeds run.")
        self._cache: dict[tuple, Any] = {}

    # -- evaluation ------------------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return list(self.scores)

    def require_gold(self) -> GoldStandard:
        if self.gold is None:
            raise ValueError("This report has no gold standard; run with a FurtherTrainingLoop to evaluate.")
        return self.gold

    def _memo(self, key: tuple, compute: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def aligned_scores(self, label: str) -> Tensor:
        """The estimator's scores on the gold standard's ``[T_gold, m]`` grid (its tests × LOO set)."""
        self.require_gold()
        return self.scores[label][self._rows][:, self._columns]

    def agreement(self, label: str, adjust: str = "mean", method: str = "cosine") -> Agreement:
        """Agreement curve ``[C]`` (mean ± s.e. over tests) of ``label`` with the gold standard."""
        gold = self.require_gold()
        return self._memo(
            ("agreement", label, adjust, method),
            lambda: agreement(self.aligned_scores(label), gold.scores(adjust), method),
        )

    def noise_ceiling(self, adjust: str = "mean", method: str = "cosine") -> Agreement | None:
        """Split-half agreement of the gold standard with itself ``[C]``; ``None`` with a single seed."""
        gold = self.require_gold()
        if len(gold.seeds) < 2:
            return None
        return self._memo(("ceiling", adjust, method), lambda: noise_ceiling(gold.differences(adjust), method))

    def seed_averaging(self, label: str, adjust: str = "mean", method: str = "cosine") -> dict[int, Agreement]:
        """``{k: curve [C]}`` with gold standards from groups of ``k`` seeds (SPEC §4)."""
        gold = self.require_gold()
        return self._memo(
            ("seeds", label, adjust, method),
            lambda: seed_averaging(self.aligned_scores(label), gold.differences(adjust), self.seed_ks, method),
        )

    def mislabel_auc(self, label: str) -> float | None:
        """AUC-ROC of the estimator's scores for the flipped labels (``None`` without ``mislabeled``)."""
        if self.mislabeled is None:
            return None
        return float(mislabel_auroc(self.scores[label], self.mislabeled))

    def top_k(self, label: str, k: int = 5):
        """Most helpful and most harmful training instances per test instance (dataset indices)."""
        return top_k_examples(self.scores[label], min(k, self.train_indices.numel()), self.train_indices)

    def table(self, adjust: str = "mean") -> list[dict[str, Any]]:
        """One row per estimator: peak and final agreement (when there is a gold standard) and cost."""
        rows = []
        for label in self.labels:
            row: dict[str, Any] = {
                "estimator": label,
                "seconds": self.seconds.get(label, float("nan")),
                "peak_memory_mib": self.peak_memory.get(label, 0) / 2**20,
            }
            if self.gold is not None:
                for method in METHODS:
                    curve = self.agreement(label, adjust, method)
                    i, mean, sem = curve.peak()
                    row[f"peak_{method}"] = (mean, sem, self.gold.checkpoints[i])
                    row[f"final_{method}"] = (float(curve.mean[-1]), float(curve.sem[-1]))
            rows.append(row)
        return rows

    # -- text ----------------------------------------------------------------------------------
    def _checkpoint_word(self) -> str:
        return self.gold.checkpoint_unit if self.gold is not None else "checkpoint"

    def summary(self, adjust: str = "mean") -> str:
        """A fixed-width table of agreement and cost per estimator (printed at the end of a run)."""
        unit = self._checkpoint_word()
        head = ["estimator"]
        if self.gold is not None:
            head += ["peak cosine", unit, "peak Spearman", unit]
        head += ["time (s)", "memory (MiB)"]
        body = []
        for row in self.table(adjust):
            line = [row["estimator"]]
            if self.gold is not None:
                for method in METHODS:
                    mean, sem, at = row[f"peak_{method}"]
                    line += [_fmt(mean, sem), str(at)]
            line += [f"{row['seconds']:.2f}", f"{row['peak_memory_mib']:.1f}"]
            body.append(line)
        if self.gold is not None:
            ceiling = self.noise_ceiling(adjust, "cosine")
            if ceiling is not None:
                i, mean, sem = ceiling.peak()
                body.append(["noise ceiling", _fmt(mean, sem), str(self.gold.checkpoints[i]), "", "", "", ""])
        widths = [max(len(r[c]) for r in [head, *body]) for c in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]]
        title = "Attribution vs further training" if self.gold is not None else "Attribution"
        if self.gold is not None:
            title += f" ({adjust} adjustment, mean ± s.e. over {self.gold.test_indices.numel()} tests)"
        return "\n".join([title, lines[0], "-" * len(lines[0]), *lines[1:]])

    def to_markdown(self, top_k: int = 5, max_tests: int = 5) -> str:
        """The report as Markdown: agreement tables, seed averaging, top examples, settings, versions."""
        out = ["# Attribution report", ""]
        out += [f"- {k.replace('_', ' ')}: {v}" for k, v in self.info.items() if k != "versions"]
        out.append(
            f"- scored: {self.train_indices.numel()} training × {self.test_indices.numel()} test instances"
        )
        out.append(f"- peak memory: {self.memory_kind or 'not measured'}")
        out.append("- sign: positive = the training instance helps the test instance (SPEC §1)")
        if self.gold is not None:
            out += self._markdown_gold()
        else:
            out += ["", "## Cost", "", "| estimator | time (s) | peak memory (MiB) |", "|---|---:|---:|"]
            out += [
                f"| {r['estimator']} | {r['seconds']:.2f} | {r['peak_memory_mib']:.1f} |" for r in self.table()
            ]
        if self.mislabeled is not None:
            out += ["", f"## Mislabel detection ({int(self.mislabeled.sum())} flipped of "
                    f"{self.mislabeled.numel()}; AUC-ROC of −Σ_tests score)", "",
                    "| estimator | AUC |", "|---|---:|"]
            out += [f"| {label} | {self.mislabel_auc(label):.3f} |" for label in self.labels]
        out += self._markdown_top(top_k, max_tests)
        out += ["", "## Estimator settings", ""]
        out += [f"- **{label}**: `{json.dumps(self.settings.get(label, {}), sort_keys=True)}`" for label in self.labels]
        versions = self.info.get("versions", {})
        if versions:
            out += ["", "## Library versions", "", ", ".join(f"{k} {v}" for k, v in versions.items())]
        return "\n".join(out) + "\n"

    def _markdown_gold(self) -> list[str]:
        gold = self.require_gold()
        unit = gold.checkpoint_unit
        out = [
            f"- gold standard: {gold!r}",
            f"- checkpoints ({unit}s): {', '.join(str(c) for c in gold.checkpoints)}",
        ]
        for adjust in gold.adjustments:
            out += [
                "",
                f"## Agreement with further training ({adjust} adjustment)",
                "",
                f"Mean ± standard error over {gold.test_indices.numel()} test instances; peak over {unit}s.",
                "",
                f"| estimator | peak cosine | at {unit} | final cosine | peak Spearman | at {unit} "
                "| time (s) | peak memory (MiB) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in self.table(adjust):
                pc, fc, ps = r["peak_cosine"], r["final_cosine"], r["peak_spearman"]
                out.append(
                    f"| {r['estimator']} | {_fmt(pc[0], pc[1])} | {pc[2]} | {_fmt(*fc)} | {_fmt(ps[0], ps[1])} "
                    f"| {ps[2]} | {r['seconds']:.2f} | {r['peak_memory_mib']:.1f} |"
                )
            ceilings = [self.noise_ceiling(adjust, m) for m in METHODS]
            if ceilings[0] is not None:
                (ic, mc, sc), (is_, ms, ss) = (c.peak() for c in ceilings)
                final = ceilings[0]
                out.append(
                    f"| *noise ceiling (split-half)* | {_fmt(mc, sc)} | {gold.checkpoints[ic]} "
                    f"| {_fmt(float(final.mean[-1]), float(final.sem[-1]))} | {_fmt(ms, ss)} "
                    f"| {gold.checkpoints[is_]} | | |"
                )
            out += ["", f"### Seed averaging ({adjust} adjustment): peak cosine with groups of k seeds", ""]
            out.append("| estimator | " + " | ".join(f"k = {k}" for k in self.seed_ks) + " |")
            out.append("|---|" + "---:|" * len(self.seed_ks))
            for label in self.labels:
                curves = self.seed_averaging(label, adjust)
                cells = []
                for k in self.seed_ks:
                    _, mean, sem = curves[k].peak()
                    cells.append(_fmt(mean, sem))
                out.append(f"| {label} | " + " | ".join(cells) + " |")
        return out

    def _markdown_top(self, k: int, max_tests: int) -> list[str]:
        shown = min(max_tests, self.test_indices.numel())
        out = [
            "",
            f"## Most helpful / most harmful training instances (first {shown} test instances, k = "
            f"{min(k, self.train_indices.numel())})",
            "",
        ]
        for label in self.labels:
            top = self.top_k(label, k)
            out += [f"**{label}**", "", "| test | most helpful (index: score) | most harmful (index: score) |",
                    "|---:|---|---|"]
            for t in range(shown):
                helpful = ", ".join(
                    f"{int(i)}: {float(s):.3g}" for i, s in zip(top.helpful_indices[t], top.helpful_scores[t])
                )
                harmful = ", ".join(
                    f"{int(i)}: {float(s):.3g}" for i, s in zip(top.harmful_indices[t], top.harmful_scores[t])
                )
                out.append(f"| {int(self.test_indices[t])} | {helpful} | {harmful} |")
            out.append("")
        return out[:-1]

    def print_summary(self) -> None:
        print(self.summary(), flush=True)

    def __repr__(self) -> str:
        gold = "none" if self.gold is None else repr(self.gold)
        return (
            f"AttributionReport(estimators={self.labels}, n_test={self.test_indices.numel()}, "
            f"n_train={self.train_indices.numel()}, gold={gold})"
        )

    # -- persistence ------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "labels": self.labels,
            "seconds": self.seconds,
            "peak_memory": self.peak_memory,
            "memory_kind": self.memory_kind,
            "settings": self.settings,
            "seed_ks": self.seed_ks,
            "info": self.info,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the report into ``directory`` (created if needed); returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"scores/{label}": s.contiguous() for label, s in self.scores.items()}
        tensors["train_indices"] = self.train_indices.contiguous()
        tensors["test_indices"] = self.test_indices.contiguous()
        if self.mislabeled is not None:
            tensors["mislabeled"] = self.mislabeled.contiguous()
        atomic_write(directory / SCORES_FILE, lambda tmp: save_file(tensors, tmp))
        gold_path = directory / GOLD_FILE
        if self.gold is not None:
            self.gold.save(gold_path)
        elif gold_path.exists():
            gold_path.unlink()
        text = json.dumps(self._metadata(), indent=2, sort_keys=False)
        atomic_write(directory / META_FILE, lambda tmp: Path(tmp).write_text(text + "\n"))
        self.write_markdown(directory)
        return directory

    def write_markdown(self, directory: str | os.PathLike) -> Path:
        """Write :meth:`to_markdown` to ``directory/report.md``."""
        path = Path(directory) / MARKDOWN_FILE
        text = self.to_markdown()
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AttributionReport:
        """Read a report written by :meth:`save`."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"No attribution report in {directory} (missing {META_FILE}).")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: unsupported report format {meta.get('format_version')!r}.")
        tensors = load_file(str(directory / SCORES_FILE))
        gold_path = directory / GOLD_FILE
        return cls(
            scores={label: tensors[f"scores/{label}"] for label in meta["labels"]},
            train_indices=tensors["train_indices"],
            test_indices=tensors["test_indices"],
            gold=GoldStandard.load(gold_path) if gold_path.exists() else None,
            seconds=meta["seconds"],
            peak_memory=meta["peak_memory"],
            memory_kind=meta["memory_kind"],
            settings=meta["settings"],
            mislabeled=tensors.get("mislabeled"),
            seed_ks=meta["seed_ks"],
            info=meta["info"],
        )

    def equals(self, other: AttributionReport) -> bool:
        """Exact equality of every tensor and field."""
        same_gold = (self.gold is None and other.gold is None) or (
            self.gold is not None and other.gold is not None and self.gold.equals(other.gold)
        )
        same_flags = (self.mislabeled is None and other.mislabeled is None) or (
            self.mislabeled is not None
            and other.mislabeled is not None
            and torch.equal(self.mislabeled, other.mislabeled)
        )
        return (
            self.labels == other.labels
            and all(
                self.scores[k].dtype == other.scores[k].dtype and torch.equal(self.scores[k], other.scores[k])
                for k in self.labels
            )
            and torch.equal(self.train_indices, other.train_indices)
            and torch.equal(self.test_indices, other.test_indices)
            and same_gold
            and same_flags
            and self._metadata() == other._metadata()
        )


def _positions(haystack: Tensor, needles: Tensor, what: str) -> Tensor:
    """Positions of ``needles`` in ``haystack``; every needle must be present."""
    lookup = {int(v): i for i, v in enumerate(haystack.tolist())}
    missing = [int(v) for v in needles.tolist() if int(v) not in lookup]
    if missing:
        raise ValueError(
            f"The gold standard's {what} indices {missing[:5]} were not scored by the estimators; "
            "score a superset of the gold standard's indices."
        )
    return torch.tensor([lookup[int(v)] for v in needles.tolist()], dtype=torch.long)

