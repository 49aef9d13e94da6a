"""The attribution pipeline shared by :func:`~lightning_fimoda.attribute` and ``FiMODACallback``.

``build_estimators`` (names / mappings / objects → estimators, validated when built) →
``check_estimators`` (each estimator's cheap ``check``, before any expensive work) →
``run_estimators`` (fit and score each in eval mode, timed; each result saved to a
:class:`~lightning_fimoda.score_store.ScoreStore` as soon as it exists and reused from it on a rerun;
with ``keep_going=True`` a failing estimator becomes an :class:`EstimatorRun` with ``error`` set while
the others go on).
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ._data import model_device_dtype, resolve_indices
from ._progress import StageLog, show_bars
from .distributed import broadcast_from_zero, rank_and_world
from .estimators.base import Estimator
from .exceptions import ConfigurationError, FiMODAError
from .functional import eval_mode
from .gradients import DEFAULT_MEMORY_BUDGET, GradientCache
from .profiling import PeakMemory
from .registry import build_estimator
from .score_store import ScoreStore, experiment_digest, fingerprint
from .task import AttributionTask

__all__ = ["EstimatorRun", "EstimatorSpec", "build_estimators", "check_estimators", "run_estimators"]

EstimatorSpec = str | Mapping[str, Any] | Estimator


@dataclass
class EstimatorRun:
    """One estimator's result.

    Attributes:
        label: the estimator's label.
        scores: ``[n_test, n_train]``, or ``[n_checkpoints, n_test, n_train]`` when
            ``checkpoint_indexed`` (one score matrix per gold-standard checkpoint); ``None`` on failure.
        seconds: wall time of fit + score.
        settings: the estimator's settings (JSON-safe values).
        peak_memory: bytes above the level at its start (:class:`~lightning_fimoda.profiling.PeakMemory`),
            ``None`` when not measured.
        error: ``"ExceptionType: message"`` when the estimator failed, else ``None``.
        checkpoint_indexed: whether ``scores`` has a leading checkpoint axis.
        reused: whether the scores were loaded from a :class:`ScoreStore` instead of computed.
    """

    label: str
    scores: Tensor | None
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    peak_memory: int | None = None
    error: str | None = None
    checkpoint_indexed: bool = False
    reused: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def build_estimators(estimators: EstimatorSpec | Sequence[EstimatorSpec]) -> list[Estimator]:
    """Names, built estimators and ``{"name": ..., **kwargs}`` mappings → estimators (unique labels)."""
    if isinstance(estimators, (str, Mapping, Estimator)):
        estimators = [estimators]
    built = []
    for spec in estimators:
        if isinstance(spec, Mapping):
            kwargs = dict(spec)
            name = kwargs.pop("name", None)
            if not isinstance(name, str):
                raise ConfigurationError(f"An estimator given as a mapping needs a 'name' key, got {dict(spec)}.")
            built.append(build_estimator(name, **kwargs))
        elif isinstance(spec, str):
            built.append(build_estimator(spec))
        elif isinstance(spec, Estimator):
            built.append(spec)
        else:
            raise TypeError(
                f"Estimators are names, {{'name': ...}} mappings or Estimator instances; got {type(spec).__name__}."
            )
    if not built:
        raise ConfigurationError("No estimators given.")
    labels = [e.label for e in built]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise ConfigurationError(f"Duplicate estimator labels {dupes}: give each a distinct label=.")
    return built


def check_estimators(estimators: Sequence[Estimator], model: nn.Module, task: AttributionTask, train_dataset: Any) -> None:
    """Every estimator's cheap validation (``est.check``), before any expensive work."""
    if not isinstance(task, AttributionTask):
        raise TypeError(f"task must be an AttributionTask, got {type(task).__name__}.")
    for est in estimators:
        est.check(model, task, train_dataset)


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _fit_and_score(est, model, task, train_ds, test_ds, train_idx, test_idx, cache, measure_memory) -> EstimatorRun:
    device, _ = model_device_dtype(model)
    meter = PeakMemory(device) if measure_memory else contextlib.nullcontext()
    with meter:
        start = time.perf_counter()
        est.fit(model, task, train_ds, train_idx, cache=cache)
        scores = est.score(test_ds, test_idx)
        seconds = time.perf_counter() - start
    peak = meter.peak_bytes if measure_memory else None
    indexed = bool(getattr(type(est), "checkpoint_indexed", False))
    return EstimatorRun(est.label, scores, seconds, est.settings(), peak, checkpoint_indexed=indexed)


def run_estimators(
    model: nn.Module,
    task: AttributionTask,
    train_dataset: Any,
    test_dataset: Any,
    estimators: EstimatorSpec | Sequence[EstimatorSpec],
    train_indices: Sequence[int] | Tensor | None = None,
    test_indices: Sequence[int] | Tensor | None = None,
    *,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    progress: bool | None = None,
    cache: GradientCache | None = None,
    share_gradients: bool = True,
    measure_memory: bool = False,
    store: ScoreStore | None = None,
    keep_going: bool = False,
) -> list[EstimatorRun]:
    """Check, then fit and score every estimator in eval mode; time each one.

    ``share_gradients=True`` (default): one gradient cache (``cache``, or a new one) serves every
    estimator, so per-sample gradients are computed once. ``False``: each estimator gets a fresh cache,
    so its time and memory include the gradients it needs (a fair cost comparison).
    ``measure_memory=True`` records each estimator's peak memory (:class:`PeakMemory`).
    ``store``: save each estimator's scores as soon as they exist and reuse saved ones whose
    fingerprint matches (see :mod:`~lightning_fimoda.score_store`). ``keep_going=True``: a failing
    estimator is returned with ``error`` set (and printed) instead of stopping the others.
    ``progress``: ``None`` = bars in a terminal, one line per estimator otherwise (see ``_progress``).

    In a ``torch.distributed`` process group, call this on every rank with the same arguments: the
    estimators' sums over training examples are split over the ranks and every rank returns the same
    scores (see :mod:`~lightning_fimoda.distributed`); only rank 0 reads and writes ``store``.
    """
    if cache is not None and not share_gradients:
        raise ConfigurationError("cache= is a shared gradient cache; it cannot be used with share_gradients=False.")
    built = build_estimators(estimators)
    train_idx = resolve_indices(train_dataset, train_indices, "training")
    test_idx = resolve_indices(test_dataset, test_indices, "test")
    check_estimators(built, model, task, train_dataset)
    bars = show_bars(progress)

    def new_cache() -> GradientCache:
        return GradientCache(memory_budget=memory_budget, progress=bars)

    shared = (cache if cache is not None else new_cache()) if share_gradients else None
    experiment = None
    if store is not None:
        experiment = experiment_digest(model, task, train_dataset, test_dataset, train_idx, test_idx)
    stages = StageLog(len(built), progress, what="estimator")
    runs = []
    with eval_mode(model):
        for est in built:
            key = fingerprint(est, experiment) if experiment is not None else ""
            run = _stored(store, est.label, key)
            if run is None:
                run = _attempt(est, keep_going, model, task, train_dataset, test_dataset, train_idx, test_idx,
                               shared if shared is not None else new_cache(), measure_memory)
                if store is not None and run.ok and rank_and_world()[0] == 0:
                    store.save(run, key)
            stages.finished(est.label, run.seconds, "failed" if not run.ok else "reused" if run.reused else "")
            runs.append(run)
    return runs


def _stored(store: ScoreStore | None, label: str, key: str) -> EstimatorRun | None:
    """The saved run of ``label`` when its fingerprint matches, read by rank 0 and sent to every rank."""
    if store is None:
        return None
    return broadcast_from_zero(store.load(label, key) if rank_and_world()[0] == 0 else None)


def _attempt(est: Estimator, keep_going: bool, *args: Any) -> EstimatorRun:
    """``_fit_and_score``; with ``keep_going`` a failure becomes a run with ``error`` (and is printed)."""
    start = time.perf_counter()
    try:
        return _fit_and_score(est, *args)
    except Exception as err:  # noqa: BLE001 - reported in the run and on the console, the others go on
        if not keep_going:
            raise
        if not isinstance(err, FiMODAError):  # our own errors say what to do; others get their traceback
            traceback.print_exc()
        print(f"FiMODA: estimator {est.label!r} failed ({_error_text(err)}); continuing with the others.", flush=True)
        return EstimatorRun(est.label, None, time.perf_counter() - start, _safe_settings(est), error=_error_text(err),
                            checkpoint_indexed=bool(getattr(type(est), "checkpoint_indexed", False)))


def _safe_settings(est: Estimator) -> dict[str, Any]:
    try:
        return est.settings()
    except Exception:  # noqa: BLE001 - a broken estimator's settings must not hide its error
        return {"estimator": getattr(est, "name", type(est).__name__)}
