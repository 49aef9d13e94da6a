"""``FurtherTrainingLoop``: the leave-one-out further-training gold standard (SPEC §2).

For every seed ``s`` and every ``j ∈ J`` the final model ``θ̂`` is trained further without ``z_j``
(``subtract`` or ``drop``), with a fresh optimizer and the seed's sample order, and ``f`` is measured
on the chosen test instances at every checkpoint; the full-data run of each seed is added when the
``full`` adjustment is requested. The result is a :class:`~lightning_fimoda.GoldStandard`.

``run()`` is bind → plan → execute → assemble: :meth:`FurtherTrainingLoop.check` validates the inputs
(cheaply, before any work), :func:`~.plan.make_plan` resolves a :class:`~.plan.TrainingPlan` with its
content fingerprint (:mod:`.fingerprint`), every rank's fingerprint is compared, the run directory is
bound (:mod:`.store`), units ``(seed, chunk of J)`` are computed and stored, and the units assembled.
Each unit is one call of an engine:

- ``"vectorised"`` (:mod:`.engine`): the chunk's runs trained at once with stacked parameters,
  gradients by ``torch.func.vmap(grad)`` of the task (any model the task can run under ``vmap``);
- ``"mlp"``: the same engine with hand-written gradients (:mod:`.mlp`; on CPU its compiled step,
  :mod:`.native`) for ``nn.Sequential`` MLPs with a ``SupervisedTask`` — ``"auto"`` picks it whenever
  it applies; ``info["mlp_kernel"]`` says which path ran and why;
- ``"sequential"`` (:mod:`.sequential`): one model copy and ``torch.optim`` per run — the oracle, and
  the fallback when ``train_mode=True`` meets dropout or BatchNorm (their train-mode behaviour cannot
  be batched; dropout masks are then shared per seed and step as far as possible).

By default further training runs with the model in **eval mode** (dropout off, BatchNorm on its
running statistics): deterministic, identical across runs, and what the paper's MLPs do anyway.
Half-precision models are refused (:class:`~lightning_fimoda.exceptions.PrecisionError`): the
leave-one-out differences are below their resolution; convert the model with ``.float()``.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._data import dataset_length, resolve_indices
from .._progress import ClockBar, StageLog, WorkClock, show_bars
from ..exceptions import ConfigurationError, MismatchError, RunDirBusyError
from ..functional import full_float32
from ..gold_standard import GoldStandard
from ..gradients.budget import resolve_memory_budget
from ..task import AttributionTask, resolve_task
from .checks import check_data_finite, check_model, check_task_shapes
from .config import FurtherTrainingConfig
from .distributed import all_gather, check_same_job, rank_and_world, shard
from .fingerprint import fingerprint_id
from .plan import ENGINES, TrainingPlan, make_plan
from .store import CorruptUnitError, RunStore

__all__ = ["CostEstimate", "FurtherTrainingLoop"]

SETTINGS = tuple(f.name for f in fields(FurtherTrainingConfig))
Results = dict[tuple[int, int], tuple[Tensor, Tensor | None]]


@dataclass(frozen=True)
class CostEstimate:
    """Dry-run cost of a further-training job (nothing is trained).

    Attributes:
        runs: further-training runs, ``S · (m + 1)`` with the full run, else ``S · m``.
        units: units of work ``(seed, chunk)``; ``chunk_size``: LOO runs per unit.
        steps_per_run: optimizer steps of the full run.
        sample_gradients: per-example loss gradients over all runs (the ``S · (m+1) · E · n`` of
            SPEC §2, counting the subtracted ``ℓ_j`` term of every ``subtract`` step).
        measurements: evaluations of ``f`` (runs × checkpoints × test instances).
    """

    runs: int
    units: int
    chunk_size: int
    steps_per_run: int
    sample_gradients: int
    measurements: int

    def __str__(self) -> str:
        return (
            f"{self.runs} runs in {self.units} units of <= {self.chunk_size} LOO runs, {self.steps_per_run} "
            f"steps each: {self.sample_gradients:,} sample gradients, {self.measurements:,} measurements"
        )


class FurtherTrainingLoop:
    """Leave-one-out further training from the final weights (SPEC §2).

    Args:
        task: how to compute losses / measurements; ``None``: ``model.attribution_task()``.
        config: a :class:`FurtherTrainingConfig`; or give its settings as keywords instead
            (``optimizer``, ``lr``, ``epochs`` / ``steps``, ``batch_size``, ``seeds``, ``leave_out``,
            ``eval_every``, ``weight_decay``, ``momentum``, ``betas``, ``eps``, ``grad_clip``,
            ``adjustments``, ``train_mode``; see the config for their meaning).
        run_dir: directory to store finished units in and resume from; ``None``: keep in memory.
        run_root: with ``run_dir=None``, store under ``run_root/<job fingerprint id>/`` instead: every
            distinct job (weights, architecture, task, data, settings) gets its own run directory.
        progress: show a progress bar (optimizer steps of all runs, with ETA; units done as postfix);
            ``None``: a bar in a terminal, else one stderr line per finished unit with its ETA.
        engine: ``"auto"`` (``"mlp"`` when the model is a plain MLP, else ``"vectorised"``),
            ``"mlp"``, ``"vectorised"`` or ``"sequential"`` (see the module docstring).
        chunk_size: LOO runs per unit; ``None``: as many as fit ``memory_budget`` bytes beside the full
            run, spread evenly over the units (``info["memory"]`` says how: :func:`.plan.run_bytes`).
        memory_budget: bytes for one unit's stacked runs; ``None``: 25% of the memory available on the
            model's device (:func:`~lightning_fimoda.gradients.resolve_memory_budget`).

    Engine, chunk size, memory budget, device and progress do not change the numbers, so they are
    not in the job's fingerprint; a ``run_dir`` keeps the engine and chunk size it was started with.

    Example::

        loop = FurtherTrainingLoop(SupervisedTask("mse"), lr=3e-2, epochs=50, batch_size=128, seeds=10,
                                   run_dir="runs/gold")
        print(loop.estimate(model, train, test, loo_indices=list(range(100))))  # dry run
        gold = loop.run(model, train, test, loo_indices=list(range(100)))
        gold.scores("mean")  # [epochs, n_test, 100]; positive = z_j helps f(x)
    """

    config_class: type[FurtherTrainingConfig] = FurtherTrainingConfig

    @classmethod
    def resolve_config(cls, config: FurtherTrainingConfig | None, settings: dict[str, Any]) -> FurtherTrainingConfig:
        """``config``, or one built from the keyword ``settings`` (not both), of :attr:`config_class`."""
        if config is None:
            return cls.config_class(**settings)
        if settings:
            raise ConfigurationError(f"Give config= or settings as keywords, not both (got config and {sorted(settings)}).")
        if not isinstance(config, cls.config_class):
            raise TypeError(f"config must be a {cls.config_class.__name__}, got {type(config).__name__}.")
        return config

    def __init__(
        self,
        task: AttributionTask | None = None,
        *,
        config: FurtherTrainingConfig | None = None,
        run_dir: str | Path | None = None,
        run_root: str | Path | None = None,
        progress: bool | None = True,
        engine: str = "auto",
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        **settings: Any,
    ) -> None:
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise TypeError(f"FurtherTrainingLoop got unknown settings {unknown}; valid: {sorted(SETTINGS)}.")
        config = self.resolve_config(config, settings)
        if engine not in ENGINES:
            raise ConfigurationError(f"engine must be one of {ENGINES}, got {engine!r}.")
        if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
            raise ConfigurationError(f"chunk_size must be None or a positive integer, got {chunk_size!r}.")
        if memory_budget is not None:
            resolve_memory_budget(memory_budget)  # a positive number of bytes, or None
        self.task, self.config = task, config
        self.engine, self.chunk_size, self.memory_budget = engine, chunk_size, memory_budget
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_root = Path(run_root) if run_root is not None else None
        self.progress = progress
        self.info: dict[str, Any] = {}
        self._timing: dict[str, Any] = {}

    @property
    def seeds(self) -> list[int]:
        return list(self.config.seeds)

    @property
    def adjustments(self) -> tuple[str, ...]:
        return self.config.adjustments

    @property
    def full_run(self) -> bool:
        """Whether the full-data run is made (only the ``full`` adjustment needs it)."""
        return self.config.full_run

    # -- public entry points ----------------------------------------------------------------------
    def check(
        self,
        model: nn.Module,
        train_dataset: Any,
        test_dataset: Any,
        loo_indices: Sequence[int] | Tensor,
        test_indices: Sequence[int] | Tensor | None = None,
    ) -> tuple[AttributionTask, Tensor, Tensor]:
        """Cheap checks before any work; returns ``(task, loo_indices [m], test_indices [n_test])``.

        Checks the model (not half precision, not on the meta device, finite weights), the indices,
        the schedule over the training set, that the task returns one loss / measurement per example,
        and that the training data and the measured test items are finite. Raises the errors of
        :mod:`lightning_fimoda.exceptions` saying what is wrong. ``run()`` calls it first.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        task = resolve_task(model, self.task)
        check_model(model)
        self.config.schedule(dataset_length(train_dataset, "training"))
        loo_idx = resolve_indices(train_dataset, loo_indices, "LOO (training)")
        test_idx = resolve_indices(test_dataset, test_indices, "test")
        device = next(model.parameters()).device
        check_task_shapes(model, task, train_dataset, test_dataset, int(test_idx[0]), device)
        check_data_finite(train_dataset, torch.arange(len(train_dataset)), "training")
        check_data_finite(test_dataset, test_idx, "test")
        return task, loo_idx, test_idx

    def plan(self, model: nn.Module, train_dataset: Any, test_dataset: Any, loo_indices: Sequence[int] | Tensor,
                test_indices: Sequence[int] | Tensor | None = None) -> TrainingPlan:
        """Check the inputs and resolve the job (engine, chunk size, fingerprint); trains nothing."""
        task, loo_idx, test_idx = self.check(model, train_dataset, test_dataset, loo_indices, test_indices)
        return make_plan(
            self.config, model, task, train_dataset, test_dataset, loo_idx, test_idx,
            self.engine, self.chunk_size, self.memory_budget,
        )

    def run(self, model: nn.Module, train_dataset: Any, test_dataset: Any, loo_indices: Sequence[int] | Tensor,
               test_indices: Sequence[int] | Tensor | None = None) -> GoldStandard:
        """Train every run and return the measurements as a :class:`GoldStandard`.

        ``loo_indices``: the set ``J`` (training indices, ``[m]``); ``test_indices``: test instances to
        measure (default: all). Under ``torch.distributed`` every rank must call this; all return the
        same result. ``self.info`` then holds the engine, ``chunk_size``, ``units_computed`` /
        ``units_loaded``; ``memory``: the budget and how the chunk size was set from it; ``progress``:
        this rank's ``seconds`` and, after each unit, the elapsed time and the ETA of the rest.
        """
        plan = self.plan(model, train_dataset, test_dataset, loo_indices, test_indices)
        check_same_job(plan.fingerprint)  # every rank the same job, before any work
        plan, store, loaded, corrupt = self._bind(plan)
        try:
            return self._run_bound(plan, store, loaded, corrupt)
        finally:
            if store is not None:
                store.unlock()

    def _run_bound(
        self, plan: TrainingPlan, store: RunStore | None, loaded: Results, corrupt: list[str]
    ) -> GoldStandard:
        """Compute the pending units, assemble and save the result (the run directory locked)."""
        units = plan.units()
        pending = [u for u in units if (u[0], u[1]) not in loaded]
        with full_float32():
            results = self._execute(plan, store, pending)
        results.update(loaded)
        self.info = {
            "engine": plan.engine,
            "mlp_kernel": plan.kernel_path(),
            "chunk_size": plan.chunk_size,
            "units": len(units),
            "units_computed": len(pending),
            "units_loaded": len(loaded),
            "units_corrupt": corrupt,
            "run_dir": str(store.root) if store is not None else None,
            "memory": plan.memory,
            "progress": self._timing,
        }
        gold = plan.assemble(results)
        if store is not None and rank_and_world()[0] == 0:
            gold.save(store.root / "gold_standard.safetensors")
        return gold

    def estimate(
        self,
        model: nn.Module,
        train_dataset: Any,
        test_dataset: Any,
        loo_indices: Sequence[int] | Tensor,
        test_indices: Sequence[int] | Tensor | None = None,
    ) -> CostEstimate:
        """Dry run: the cost of :meth:`run` with these arguments, without training anything."""
        plan = self.plan(model, train_dataset, test_dataset, loo_indices, test_indices)
        spec, m, s = plan.schedule, plan.loo_indices.numel(), len(self.seeds)
        per_loo = _examples(spec, excluded=True)
        per_full = _examples(spec, excluded=False)
        if spec.leave_out == "subtract":
            per_loo += spec.total_steps  # the subtracted ℓ_j of every step
        runs = s * (m + int(self.full_run))
        return CostEstimate(
            runs=runs,
            units=len(plan.units()),
            chunk_size=plan.chunk_size,
            steps_per_run=spec.total_steps,
            sample_gradients=s * (m * per_loo + int(self.full_run) * per_full),
            measurements=runs * len(spec.checkpoints) * plan.test_indices.numel(),
        )

    def settings(self) -> dict[str, Any]:
        """The configuration as JSON-serialisable values."""
        return self.config.to_dict()

    def __repr__(self) -> str:
        return f"FurtherTrainingLoop({json.dumps(self.settings())})"

    # -- the stages of run() ----------------------------------------------------------------------
    def _bind(self, plan: TrainingPlan) -> tuple[TrainingPlan, RunStore | None, Results, list[str]]:
        """Bind ``run_dir`` on rank 0 and load its verified units (corrupt ones moved aside)."""
        job_id = fingerprint_id(plan.fingerprint)
        if self.run_dir is None and self.run_root is None:
            return plan, None, {}, []
        rank = rank_and_world()[0]
        store = RunStore(self.run_dir if self.run_dir is not None else self.run_root / job_id)
        outcome: tuple[Any, ...] = (None, plan.layout, [])
        loaded: Results = {}
        if rank == 0:
            try:
                layout = store.bind(plan.fingerprint, plan.layout)
                plan = self._adopt(plan, layout)
                corrupt = []
                for seed, chunk, _ in plan.units():
                    if store.has(seed, chunk):
                        try:
                            loaded[(seed, chunk)] = store.load(seed, chunk)
                        except CorruptUnitError as err:
                            corrupt.append(f"{err}; moved to {store.quarantine(seed, chunk)}")
                for line in corrupt:
                    warnings.warn(f"FurtherTrainingLoop: {line}; it is recomputed.", stacklevel=3)
                outcome = (None, plan.layout, corrupt)
            except (MismatchError, RunDirBusyError) as err:
                store.unlock()
                outcome = (err, None, [])
        error, layout, corrupt = all_gather(outcome)[0]  # also a barrier: the directory is bound
        if error:
            raise type(error)(str(error))
        store.job_id = job_id
        plan = plan.with_layout(layout) if rank else plan
        return plan, store, all_gather(loaded)[0], corrupt  # rank 0's verified units, on every rank

    def _adopt(self, plan: TrainingPlan, layout: dict[str, Any]) -> TrainingPlan:
        if layout == plan.layout:
            return plan
        explicit = {"engine": self.engine != "auto", "chunk_size": self.chunk_size is not None}
        overridden = [k for k, v in layout.items() if explicit.get(k) and plan.layout.get(k) != v]
        if overridden:
            warnings.warn(
                f"FurtherTrainingLoop: the run_dir was started with {layout}; its units are "
                f"resumed with that layout, not the requested {plan.layout}.",
                stacklevel=4,
            )
        return plan.with_layout(layout)

    def _execute(self, plan: TrainingPlan, store: RunStore | None, pending: list) -> Results:
        """Compute this rank's share of ``pending``, store each unit, and gather every rank's.

        Timing and the ETA after each unit (:class:`~lightning_fimoda._progress.WorkClock`, in
        run-steps) go to ``self._timing``. Units holding a seed's full run go last, so that the ETA is
        measured on a typical unit (a vectorised round costs about the same with one run more)."""
        rank, world = rank_and_world()
        mine = sorted(shard(pending, rank, world), key=lambda unit: unit[2][0] is None)
        results: Results = {}
        error = None
        total = sum(plan.schedule.run_steps(excluded=j is not None) for u in mine for j in u[2])
        clock = WorkClock()
        self._timing = {"seconds": 0.0, "elapsed_after_unit": [], "eta_after_unit": []}
        bar = ClockBar(total=total, desc="further training", unit="run-step", unit_scale=True,
                       disable=not show_bars(self.progress) or rank != 0, clock=clock)
        lines = StageLog(len(mine), self.progress if rank == 0 else False, what="further-training unit")
        try:
            for done_units, (seed, chunk, members) in enumerate(mine, start=1):
                start = time.perf_counter()
                loo, full = plan.compute(seed, members, bar.update)
                if store is not None:
                    store.save(seed, chunk, loo, full, time.perf_counter() - start, rank)
                results[(seed, chunk)] = (loo, full)
                eta = clock.eta(total - clock.work)
                self._timing["elapsed_after_unit"].append(clock.elapsed())
                self._timing["eta_after_unit"].append(eta)
                bar.set_postfix_str(f"units {done_units}/{len(mine)}")
                lines.finished(f"(seed {seed}, chunk {chunk})", time.perf_counter() - start, eta=eta)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            if world == 1:
                raise
            error = f"rank {rank}: {type(err).__name__}: {err}"
        finally:
            bar.close()
            self._timing["seconds"] = clock.elapsed()
        gathered = all_gather((results, error))
        errors = [e for _, e in gathered if e]
        if errors:
            raise RuntimeError("Further training failed on " + "; ".join(errors))
        for part, _ in gathered:
            results.update(part)
        return results


def _examples(spec: Any, excluded: bool) -> int:
    """Training examples a run processes (rows of all its batches)."""
    size = spec.n - 1 if excluded and spec.leave_out == "drop" else spec.n
    if spec.epochs is not None:
        return spec.epochs * size
    per_epoch = spec.steps_per_epoch(excluded)
    full, rest = divmod(spec.steps, per_epoch)
    return full * size + min(rest * spec.batch_size, size)
