"""``AttributionReport``: everything one attribution run produced (data), its evaluation and persistence.

A report holds one :class:`~lightning_fimoda.pipeline.EstimatorRun` per estimator (scores ``[T, N]``,
``T`` test × ``N`` scored training instances with SPEC §1's sign, or ``[C, T, N]`` for a
checkpoint-indexed estimator; cost; settings; an ``error`` when it failed) and optionally the
further-training :class:`~lightning_fimoda.GoldStandard`. The evaluation against the gold standard
(SPEC §4: agreement curves per checkpoint, peaks, seed averaging, noise ceiling, mislabel AUC) is
derived on demand with :mod:`lightning_fimoda.evaluation.metrics`, so a loaded report evaluates to exactly the same
numbers. A checkpoint-indexed ("horizon-matched") estimator is compared at checkpoint ``c`` with the
gold standard at ``c``; its top-k, mislabel AUC and sorted scores use its last checkpoint.
Rendering (markdown, console table, TensorBoard text) lives in :mod:`lightning_fimoda.evaluation.rendering`.

On disk (``save(dir)``): ``scores.safetensors`` (scores and indices), ``gold_standard.safetensors``
(when there is one), ``report.json`` (every other field) and ``report.md``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .._files import atomic_write, file_mode
from .._jsonable import jsonable, library_versions
from ..exceptions import ConfigurationError
from ..gold_standard import GoldStandard
from ..pipeline import EstimatorRun
from .metrics import (
    METHODS,
    Agreement,
    TopK,
    agreement,
    mislabel_auroc,
    noise_ceiling,
    seed_averaging,
    top_k_examples,
)

__all__ = ["AttributionReport", "jsonable", "library_versions"]

SCORES_FILE = "scores.safetensors"
GOLD_FILE = "gold_standard.safetensors"
META_FILE = "report.json"
MARKDOWN_FILE = "report.md"
REPORT_FILES = (SCORES_FILE, GOLD_FILE, META_FILE, MARKDOWN_FILE)
FORMAT_VERSION = 2
_RUN_FIELDS = ("seconds", "peak_memory", "settings", "error", "checkpoint_indexed")


@dataclass(eq=False)
class AttributionReport:
    """The estimator runs, the gold standard, and their evaluation.

    Attributes:
        runs: one :class:`EstimatorRun` per estimator, in estimator order (failed ones included).
        train_indices: ``[N]`` training-set indices of the score columns.
        test_indices: ``[T]`` test-set indices of the score rows.
        gold: the further-training gold standard over ``gold.test_indices × gold.loo_indices`` (both
            contained in the indices above), or ``None``.
        memory_kind: how peak memory was measured.
        mislabeled: ``[N]`` bool, which scored training instances had their labels flipped, or ``None``.
        seed_ks: group sizes ``k`` for seed averaging (default: 1, 2, 4, ... and the number of seeds).
        info: facts about the run (model, task, dataset sizes, gold-standard time, library versions).
    """

    runs: list[EstimatorRun]
    train_indices: Tensor
    test_indices: Tensor
    gold: GoldStandard | None = None
    memory_kind: str = ""
    mislabeled: Tensor | None = None
    seed_ks: list[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_scores(
        cls,
        scores: dict[str, Tensor],
        train_indices: Tensor,
        test_indices: Tensor,
        gold: GoldStandard | None = None,
        *,
        seconds: dict[str, float] | None = None,
        peak_memory: dict[str, int] | None = None,
        settings: dict[str, dict[str, Any]] | None = None,
        checkpoint_indexed: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> AttributionReport:
        """A report from ``{label: scores}`` and per-label dicts (the form before :class:`EstimatorRun`)."""
        seconds, peak_memory, settings = seconds or {}, peak_memory or {}, settings or {}
        runs = [
            EstimatorRun(label, s, seconds.get(label, float("nan")), settings.get(label, {}), peak_memory.get(label),
                         checkpoint_indexed=label in checkpoint_indexed)
            for label, s in scores.items()
        ]
        return cls(runs, train_indices, test_indices, gold, **kwargs)

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("AttributionReport needs at least one estimator run.")
        self.train_indices = torch.as_tensor(self.train_indices).reshape(-1).long()
        self.test_indices = torch.as_tensor(self.test_indices).reshape(-1).long()
        for run in self.runs:
            run.settings = jsonable(run.settings)
            run.seconds = float(run.seconds)
            run.peak_memory = None if run.peak_memory is None else int(run.peak_memory)
            if run.ok:
                self._check_shape(run)
        if self.mislabeled is not None:
            self.mislabeled = torch.as_tensor(self.mislabeled).reshape(-1).bool()
            if self.mislabeled.numel() != self.train_indices.numel():
                raise ValueError(
                    f"mislabeled has {self.mislabeled.numel()} flags for {self.train_indices.numel()} columns."
                )
        self.info = jsonable(self.info)
        if self.gold is not None:
            self._columns = _positions(self.train_indices, self.gold.loo_indices, "LOO (training)")
            self._rows = _positions(self.test_indices, self.gold.test_indices, "test")
            self.seed_ks = _seed_ks(self.seed_ks, len(self.gold.seeds))
        self._cache: dict[tuple, Any] = {}

    def _check_shape(self, run: EstimatorRun) -> None:
        expected = (self.test_indices.numel(), self.train_indices.numel())
        if run.checkpoint_indexed:
            n_ckpt = len(self.gold.checkpoints) if self.gold is not None else run.scores.shape[0]
            expected = (n_ckpt, *expected)
        if run.scores is None or tuple(run.scores.shape) != expected:
            shape = None if run.scores is None else tuple(run.scores.shape)
            what = " (checkpoints, tests, training)" if run.checkpoint_indexed else ""
            raise ValueError(f"Scores of {run.label!r} have shape {shape}, expected {expected}{what}.")

    # -- the runs as dicts -----------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        """Labels of the estimators with scores (failed ones are in :attr:`failed`)."""
        return [r.label for r in self.runs if r.ok]

    @property
    def scores(self) -> dict[str, Tensor]:
        return {r.label: r.scores for r in self.runs if r.ok}

    @property
    def seconds(self) -> dict[str, float]:
        return {r.label: r.seconds for r in self.runs}

    @property
    def peak_memory(self) -> dict[str, int]:
        return {r.label: r.peak_memory for r in self.runs if r.peak_memory is not None}

    @property
    def settings(self) -> dict[str, dict[str, Any]]:
        return {r.label: r.settings for r in self.runs}

    @property
    def failed(self) -> dict[str, str]:
        """``{label: error}`` of the estimators that failed."""
        return {r.label: r.error for r in self.runs if not r.ok}

    @property
    def horizon_matched(self) -> list[str]:
        """Labels of the checkpoint-indexed estimators (compared with the gold standard per checkpoint)."""
        return [r.label for r in self.runs if r.ok and r.checkpoint_indexed]

    def run(self, label: str) -> EstimatorRun:
        """The successful run of ``label``; an unknown label raises an error listing the valid ones."""
        for r in self.runs:
            if r.label == label and r.ok:
                return r
        failed = f" ({label!r} failed: {self.failed[label]})" if label in self.failed else ""
        raise ConfigurationError(f"No scores for estimator {label!r}{failed}. Valid labels: {self.labels}.")

    # -- evaluation ------------------------------------------------------------------------------
    def require_gold(self) -> GoldStandard:
        if self.gold is None:
            raise ValueError("This report has no gold standard; run with a FurtherTrainingLoop to evaluate.")
        return self.gold

    def _memo(self, key: tuple, compute: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def final_scores(self, label: str) -> Tensor:
        """``[T, N]`` scores: the estimator's scores, or its last checkpoint's when checkpoint-indexed."""
        run = self.run(label)
        return run.scores[-1] if run.checkpoint_indexed else run.scores

    def aligned_scores(self, label: str) -> Tensor:
        """Scores on the gold standard's grid (its tests × LOO set): ``[T_gold, m]`` or ``[C, T_gold, m]``."""
        self.require_gold()
        return self.run(label).scores[..., self._rows, :][..., self._columns]

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
        return float(mislabel_auroc(self.final_scores(label), self.mislabeled))

    def top_k(self, label: str, k: int = 5) -> TopK:
        """Most helpful and most harmful training instances per test instance (dataset indices)."""
        return top_k_examples(self.final_scores(label), min(k, self.train_indices.numel()), self.train_indices)

    def table(self, adjust: str = "mean") -> list[dict[str, Any]]:
        """One row per estimator with scores: peak and final agreement (with a gold standard) and cost."""
        rows = []
        for run in (r for r in self.runs if r.ok):
            row: dict[str, Any] = {
                "estimator": run.label,
                "seconds": run.seconds,
                "peak_memory_mib": (run.peak_memory or 0) / 2**20,
            }
            if self.gold is not None:
                for method in METHODS:
                    curve = self.agreement(run.label, adjust, method)
                    i, mean, sem = curve.peak()
                    row[f"peak_{method}"] = (mean, sem, self.gold.checkpoints[i])
                    row[f"final_{method}"] = (float(curve.mean[-1]), float(curve.sem[-1]))
            rows.append(row)
        return rows

    # -- text (see lightning_fimoda.evaluation.rendering) ------------------------------------------------------
    def summary(self, adjust: str = "mean") -> str:
        """A fixed-width table of agreement and cost per estimator (printed at the end of a run)."""
        from .rendering import console_table

        return console_table(self, adjust)

    def to_markdown(self, top_k: int = 5, max_tests: int = 5) -> str:
        """The report as Markdown: agreement tables, seed averaging, top examples, settings, versions."""
        from .rendering import markdown

        return markdown(self, top_k, max_tests)

    def print_summary(self) -> None:
        print(self.summary(), flush=True)

    def __repr__(self) -> str:
        gold = "none" if self.gold is None else repr(self.gold)
        failed = f", failed={list(self.failed)}" if self.failed else ""
        return (
            f"AttributionReport(estimators={self.labels}{failed}, n_test={self.test_indices.numel()}, "
            f"n_train={self.train_indices.numel()}, gold={gold})"
        )

    # -- persistence ------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        runs = [{"label": r.label, **{k: getattr(r, k) for k in _RUN_FIELDS}} for r in self.runs]
        return {
            "format_version": FORMAT_VERSION,
            "labels": self.labels,
            "runs": runs,
            "memory_kind": self.memory_kind,
            "seed_ks": self.seed_ks,
            "info": self.info,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the report into ``directory`` (created if needed); returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # clones: scores may share memory (views of one tensor), which safetensors refuses
        tensors = {f"scores/{label}": s.detach().clone(memory_format=torch.contiguous_format) for label, s in self.scores.items()}
        tensors["train_indices"] = self.train_indices.contiguous()
        tensors["test_indices"] = self.test_indices.contiguous()
        if self.mislabeled is not None:
            tensors["mislabeled"] = self.mislabeled.contiguous()
        atomic_write(directory / SCORES_FILE, lambda tmp: save_file(tensors, tmp))
        gold_path = directory / GOLD_FILE
        if self.gold is not None:
            self.gold.save(gold_path)
            os.chmod(gold_path, file_mode())
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
        if meta.get("format_version") not in (1, FORMAT_VERSION):
            raise ValueError(f"{meta_path}: unsupported report format {meta.get('format_version')!r}.")
        tensors = load_file(str(directory / SCORES_FILE))
        if meta["format_version"] == 1:  # per-label dicts, every estimator succeeded
            meta["runs"] = [
                {"label": label, "seconds": meta["seconds"][label], "peak_memory": meta["peak_memory"].get(label),
                 "settings": meta["settings"].get(label, {}), "error": None, "checkpoint_indexed": False}
                for label in meta["labels"]
            ]
        runs = [
            EstimatorRun(r["label"], tensors.get(f"scores/{r['label']}") if r["error"] is None else None,
                         **{k: r[k] for k in _RUN_FIELDS})
            for r in meta["runs"]
        ]
        gold_path = directory / GOLD_FILE
        return cls(
            runs,
            tensors["train_indices"],
            tensors["test_indices"],
            GoldStandard.load(gold_path) if gold_path.exists() else None,
            memory_kind=meta["memory_kind"],
            mislabeled=tensors.get("mislabeled"),
            seed_ks=meta["seed_ks"],
            info=meta["info"],
        )

    def equals(self, other: AttributionReport) -> bool:
        """Exact equality of every tensor and field."""
        return (
            _same(self.gold, other.gold, lambda a, b: a.equals(b))
            and _same(self.mislabeled, other.mislabeled, torch.equal)
            and self.labels == other.labels
            and all(
                self.scores[k].dtype == other.scores[k].dtype and torch.equal(self.scores[k], other.scores[k])
                for k in self.labels
            )
            and torch.equal(self.train_indices, other.train_indices)
            and torch.equal(self.test_indices, other.test_indices)
            and json.dumps(self._metadata()) == json.dumps(other._metadata())  # as text: NaN equals NaN
        )


def _same(a: Any, b: Any, equal: Any) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and equal(a, b))


def _seed_ks(seed_ks: list[int] | None, num: int) -> list[int]:
    ks = sorted({2**i for i in range(num.bit_length())} | {num}) if seed_ks is None else [int(k) for k in seed_ks]
    bad = [k for k in ks if not 1 <= k <= num]
    if bad:
        raise ValueError(f"seed_ks {bad} not between 1 and the {num} seeds run.")
    return ks


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
