"""``FiMODACallback``: attribute the fitted model at the end of ``trainer.fit``.

.. code-block:: python

    trainer = Trainer(callbacks=[FiMODACallback(
        estimators=["grad_dot", {"name": "cg", "damping": 1e-3}],
        gold={"optimizer": "sgd", "lr": 3e-2, "epochs": 5, "batch_size": 128, "seeds": 10},
        num_train=100, num_test=50,
    )])
    trainer.fit(model, datamodule=dm)
    callback.report.print_summary()

What happens in ``setup()`` (before training; cheap) and at ``on_fit_end`` (or on demand with
:meth:`FiMODACallback.attribute`), through the same pipeline as :func:`~lightning_fimoda.attribute`:

1. ``setup()``: the task comes from ``task=`` or ``module.attribution_task()``; the datasets from the
   callback's ``train_dataset`` / ``test_dataset``, else the datamodule's ``train_dataset`` /
   ``test_dataset`` (``val_dataset``), else the datasets behind the trainer's train / test / validation
   dataloaders; the scored training instances (also the leave-one-out set ``J`` of the gold standard)
   and test instances: given indices, a seeded random choice of ``num_train`` / ``num_test``, or all.
   Then everything is validated: indices, ``mislabeled``, that ``output_dir`` can be written, each
   estimator's ``check`` and the gold loop's ``check`` — a bad setting fails before training;
2. the gold standard (``FurtherTrainingLoop``) runs on every process (it shards its work under DDP),
   storing finished units under ``<output_dir>/gold/``;
3. the estimators run on every process, splitting their sums over training examples over the ranks
   (:mod:`~lightning_fimoda.distributed`; the report's ``ranks`` says how many took part); the report,
   figures and logging are made on global rank 0 only; each estimator's scores are saved (by rank 0)
   under ``<output_dir>/estimators/`` as soon as they exist and reused by a rerun with the same
   settings, weights and indices (:mod:`~lightning_fimoda.score_store`); an estimator that fails
   is reported (in the report and on the console) while the others and the gold standard are kept;
4. the module is used in eval mode on the strategy's root device; its training flags, ``requires_grad``
   flags, parameter and buffer values (and ``.grad``), device, and the torch (CPU and CUDA), numpy and
   Python random states are restored afterwards.

The result is :attr:`FiMODACallback.report` (an :class:`~lightning_fimoda.AttributionReport`, ``None``
on other ranks), saved with PNG figures under ``output_dir`` (default: ``<trainer.log_dir>/fimoda``;
a previous report there is replaced, with a notice),
logged to the trainer's loggers (``log=True``) and printed as a table (``print_summary=True``).

In a LightningCLI YAML file (``trainer.callbacks``)::

    trainer:
      callbacks:
        - class_path: lightning_fimoda.FiMODACallback
          init_args:
            estimators: [grad_dot, {name: grad_cos}]
            gold: {lr: 0.03, epochs: 5, batch_size: 128, seeds: 10}
            num_train: 100
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from ._data import dataset_length, model_device_dtype, resolve_indices
from ._lightning import find_datasets, preserved_state
from ._output import check_writable, clear_previous_report
from ._progress import StageLog
from ._quiet import quiet_attribution
from .distributed import rank_and_world
from .estimators.base import Estimator
from .evaluation.report import AttributionReport, library_versions
from .evaluation.tensorboard import log_report
from .exceptions import ConfigurationError
from .gold_standard import GoldStandard
from .gradients import DEFAULT_MEMORY_BUDGET
from .pipeline import EstimatorRun, build_estimators, check_estimators, run_estimators
from .profiling import memory_kind
from .score_store import ScoreStore
from .task import AttributionTask, resolve_task

__all__ = ["FiMODACallback", "preserved_state"]


@dataclass
class _Plan:
    """Everything resolved and validated in ``setup()``: the task, datasets, indices, output folder and
    gold-standard loop."""

    task: AttributionTask
    train_ds: Any
    test_ds: Any
    train_idx: Tensor
    test_idx: Tensor
    directory: Path
    loop: Any


class FiMODACallback(Callback):
    """Final-model-only data attribution of the fitted model, evaluated against further training.

    Args:
        estimators: estimator names, ``{"name": ..., **kwargs}`` dicts (the YAML form) or built
            :class:`~lightning_fimoda.Estimator` objects; validated here. A dict with ``gold: true``
            gets the gold loop as ``gold=`` (``{name: horizon, gold: true}`` copies its SGD settings).
        gold: ``None`` (no gold standard), a ``FurtherTrainingLoop``, or a dict of its keyword arguments
            without ``task`` (the YAML form; the task is the one resolved for the module). Without a
            ``run_dir`` of its own it stores under ``<output_dir>/gold/<job fingerprint id>`` (the loop's
            ``run_root``), so finished units survive a failure and a rerun resumes them.
        train_indices: training instances to score (and leave out in the gold standard).
        num_train: instead of ``train_indices``: a random choice of this many (seeded by ``seed``).
        test_indices: test instances to attribute.
        num_test: instead of ``test_indices``: a random choice of this many (seeded by ``seed``).
        seed: seed of those random choices.
        task: the attribution task (default: ``module.attribution_task()``).
        train_dataset, test_dataset: explicit datasets (default: from the trainer, see the module doc).
        output_dir: where the report and figures go (default: ``<trainer.log_dir>/fimoda``); each
            estimator's scores are saved under ``<output_dir>/estimators`` as soon as they exist.
        log: log metrics, histograms, figures and a top-examples table to the trainer's loggers.
        plots: write PNG figures.
        print_summary: print the summary table.
        mislabeled: training-set indices whose labels were flipped (mislabel-detection AUC).
        seed_ks: group sizes for seed averaging (default 1, 2, 4, ... and the number of seeds).
        share_gradients: share one per-sample-gradient cache between estimators (faster; the first
            estimator's time and memory then include the gradients of all). Default ``True``, as in
            :func:`~lightning_fimoda.attribute`.
        memory_budget: bytes of per-sample gradients held at once (``None``: 25% of the available
            memory, resolved when the estimators run and recorded in the report).
        progress: ``None`` (default, as everywhere): progress bars in an interactive terminal, one line
            per stage with an ETA otherwise; ``True`` / ``False``: bars always / never.
    """

    def __init__(
        self,
        estimators: Sequence[str | dict[str, Any] | Estimator] = ("grad_dot",),
        gold: Any = None,
        train_indices: Sequence[int] | None = None,
        num_train: int | None = None,
        test_indices: Sequence[int] | None = None,
        num_test: int | None = None,
        seed: int = 0,
        task: AttributionTask | None = None,
        train_dataset: Any = None,
        test_dataset: Any = None,
        output_dir: str | None = None,
        log: bool = True,
        plots: bool = True,
        print_summary: bool = True,
        mislabeled: Sequence[int] | None = None,
        seed_ks: Sequence[int] | None = None,
        share_gradients: bool = True,
        memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
        progress: bool | None = None,
    ) -> None:
        super().__init__()
        if gold is not None and not isinstance(gold, Mapping) and not callable(getattr(gold, "run", None)):
            raise TypeError(f"gold must be None, a FurtherTrainingLoop or a dict of its arguments, got {gold!r}.")
        if isinstance(gold, Mapping) and "task" in gold:
            raise ConfigurationError("gold: leave out 'task'; the callback passes the task it resolved for the module.")
        self.gold = dict(gold) if isinstance(gold, Mapping) else gold
        self.progress = progress
        self.estimators = build_estimators(self._with_gold(estimators))
        for what, idx, num in (("train", train_indices, num_train), ("test", test_indices, num_test)):
            if idx is not None and num is not None:
                raise ConfigurationError(f"Give {what}_indices or num_{what}, not both.")
            if num is not None and num < 1:
                raise ConfigurationError(f"num_{what} must be >= 1, got {num}.")
        self.train_indices, self.num_train = train_indices, num_train
        self.test_indices, self.num_test = test_indices, num_test
        self.seed = seed
        if task is not None and not isinstance(task, AttributionTask):
            raise TypeError(f"task must be an AttributionTask, got {type(task).__name__}.")
        self.task = task
        self.train_dataset, self.test_dataset = train_dataset, test_dataset
        self.output_dir = output_dir
        self.log, self.plots, self.print_summary = log, plots, print_summary
        self.mislabeled = None if mislabeled is None else [int(i) for i in mislabeled]
        self.seed_ks = None if seed_ks is None else [int(k) for k in seed_ks]
        self.share_gradients = share_gradients
        self.memory_budget = memory_budget
        self.report: AttributionReport | None = None
        self.report_dir: Path | None = None
        self._plan: _Plan | None = None
        if isinstance(self.gold, dict):
            self._gold_loop(None)  # check the arguments now, not after training

    # -- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve and validate everything (task, datasets, indices, output folder, the estimators' and
        gold standard's own checks) before training starts."""
        if stage != "fit" or trainer.fast_dev_run:
            return
        self._plan = self.prepare(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.fast_dev_run:
            rank_zero_info("FiMODACallback: skipped under fast_dev_run.")
            return
        self.attribute(trainer, pl_module)

    # -- the work ----------------------------------------------------------------------------------
    def prepare(self, trainer: Trainer | None, module: nn.Module, datamodule: Any = None) -> _Plan:
        """Resolve the task, datasets, indices, output folder and gold loop, and validate them all (cheap)."""
        task = resolve_task(module, self.task)
        train_ds, test_ds = self.resolve_datasets(trainer, datamodule)
        train_idx, test_idx = self.resolve_indices(train_ds, test_ds)
        directory = self._output_dir(trainer)
        check_writable(directory)
        loop = self._gold_loop(task) if self.gold is not None else None
        check_estimators(self.estimators, module, task, train_ds)
        if loop is not None:
            loop.check(module, train_ds, test_ds, train_idx, test_idx)
        return _Plan(task, train_ds, test_ds, train_idx, test_idx, directory, loop)

    def attribute(
        self,
        trainer: Trainer | None,
        module: nn.Module,
        *,
        datamodule: LightningDataModule | None = None,
        info: dict[str, Any] | None = None,
    ) -> AttributionReport | None:
        """Attribute ``module`` now; returns the report on global rank 0 (``None`` elsewhere).

        Uses what ``setup()`` resolved (else resolves it now); ``info`` adds facts to the report.
        """
        plan, self._plan = self._plan, None
        if plan is None:
            plan = self.prepare(trainer, module, datamodule)
        is_zero = trainer is None or trainer.is_global_zero
        device = trainer.strategy.root_device if trainer is not None else model_device_dtype(module)[0]
        report = None
        with quiet_attribution(), _barrier_after(trainer), preserved_state(module), torch.enable_grad():
            module.to(device)
            gold, gold_seconds = self._run_gold(plan, module, is_zero)
            runs = run_estimators(  # on every rank: they split the sums over training examples
                module, plan.task, plan.train_ds, plan.test_ds, self.estimators, plan.train_idx, plan.test_idx,
                share_gradients=self.share_gradients, measure_memory=True, memory_budget=self.memory_budget,
                progress=self.progress if is_zero else False, store=ScoreStore(plan.directory / "estimators"),
                keep_going=True,
            )
            if is_zero:
                facts = self._info(module, plan, trainer, device, gold_seconds, info)
                report = self._make_report(plan, runs, gold, facts, device)
                self._publish(report, trainer, plan.directory)
        self.report = report
        return report

    def _run_gold(self, plan: _Plan, module: nn.Module, is_zero: bool) -> tuple[GoldStandard | None, float | None]:
        if plan.loop is None:
            return None, None
        loop = plan.loop
        if getattr(loop, "run_dir", None) is None and getattr(loop, "run_root", None) is None:
            loop.run_root = plan.directory / "gold"  # one sub-folder per job fingerprint
        stages = StageLog(1, self.progress, what="stage")
        start = time.perf_counter()
        gold = loop.run(module, plan.train_ds, plan.test_ds, plan.train_idx, plan.test_idx)
        seconds = time.perf_counter() - start
        stages.finished("gold standard (further training)", seconds)
        if is_zero and not isinstance(gold, GoldStandard):
            raise TypeError(f"The gold standard's run() returned {type(gold).__name__}, not a GoldStandard.")
        plan.loop = loop
        return gold, seconds

    def resolve_datasets(self, trainer: Trainer | None, datamodule: Any = None) -> tuple[Any, Any]:
        """``(train_dataset, test_dataset)`` in the order of precedence of the module doc."""
        return find_datasets(trainer, datamodule, self.train_dataset, self.test_dataset)

    def resolve_indices(self, train_dataset: Any, test_dataset: Any) -> tuple[Tensor, Tensor]:
        """Validated ``(train_indices, test_indices)``; random choices are seeded by ``seed``."""
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for what, ds, idx, num in (
            ("training", train_dataset, self.train_indices, self.num_train),
            ("test", test_dataset, self.test_indices, self.num_test),
        ):
            if num is not None:
                n = dataset_length(ds, what)
                if num > n:
                    raise ConfigurationError(f"Asked for {num} {what} instances but the {what} dataset has {n}.")
                idx = torch.randperm(n, generator=gen)[:num].sort().values
            out.append(resolve_indices(ds, idx, what))
        if self.mislabeled is not None:
            self._check_mislabeled(out[0], dataset_length(train_dataset, "training"))
        if self.gold is not None and out[0].numel() > 200:
            rank_zero_warn(
                f"FiMODACallback: the gold standard will leave out each of {out[0].numel()} training instances; "
                "set num_train (the paper uses 50-100) to keep further training affordable."
            )
        return out[0], out[1]

    def _check_mislabeled(self, train_idx: Tensor, n: int) -> None:
        bad = sorted(i for i in self.mislabeled if not 0 <= i < n)
        if bad:
            raise ConfigurationError(
                f"mislabeled: indices {bad[:5]} are out of range; valid training-set indices are 0..{n - 1}."
            )
        flipped = set(self.mislabeled)
        flagged = sum(int(i) in flipped for i in train_idx.tolist())
        if not 0 < flagged < train_idx.numel():
            raise ConfigurationError(
                f"mislabeled: {flagged} of the {train_idx.numel()} scored training instances are flagged; "
                "mislabel detection needs both flipped and clean ones among them."
            )

    def _with_gold(self, estimators: Any) -> Any:
        """Estimator mappings with ``gold: true`` get the gold loop (``horizon`` copies its settings)."""
        specs = [estimators] if isinstance(estimators, (str, Mapping, Estimator)) else list(estimators)
        wants = [isinstance(s, Mapping) and s.get("gold") is True for s in specs]
        if any(wants) and self.gold is None:
            raise ConfigurationError("An estimator has gold: true, but the callback has no gold standard (gold=).")
        return [{**s, "gold": self._gold_loop(None)} if w else s for s, w in zip(specs, wants)]

    def _gold_loop(self, task: AttributionTask | None) -> Any:
        if not isinstance(self.gold, dict):
            return self.gold
        from .further_training import FurtherTrainingLoop

        return FurtherTrainingLoop(task, **{"progress": self.progress, **self.gold})

    def _info(self, module, plan: _Plan, trainer, device, gold_seconds, extra) -> dict[str, Any]:
        info: dict[str, Any] = {
            "model": type(module).__name__,
            "task": repr(plan.task),
            "train_dataset_size": dataset_length(plan.train_ds, "training"),
            "test_dataset_size": dataset_length(plan.test_ds, "test"),
            "device": str(device),
            "gradients_shared_between_estimators": self.share_gradients,
            "ranks": rank_and_world()[1],
        }
        if trainer is not None:
            info["trained_epochs"] = trainer.current_epoch
            info["trained_steps"] = trainer.global_step
        info.update(extra or {})
        if gold_seconds is not None:
            info["gold_standard_seconds"] = round(gold_seconds, 3)
            info["gold_standard_run"] = getattr(plan.loop, "info", {})
            run_info = getattr(plan.loop, "info", {}) or {}  # run_root: the job's own folder under it
            info["gold_standard_run_dir"] = str(run_info.get("run_dir") or getattr(plan.loop, "run_dir", None))
        info["versions"] = library_versions()
        return info

    def _make_report(self, plan: _Plan, runs: list[EstimatorRun], gold, info, device) -> AttributionReport:
        mislabeled = None
        if self.mislabeled is not None:
            flipped = set(self.mislabeled)
            mislabeled = torch.tensor([int(i) in flipped for i in plan.train_idx.tolist()])
        return AttributionReport(
            runs, plan.train_idx, plan.test_idx, gold, memory_kind=memory_kind(torch.device(device)),
            mislabeled=mislabeled, seed_ks=self.seed_ks, info=info,
        )

    def _output_dir(self, trainer: Trainer | None) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        if trainer is None:
            return Path("fimoda")
        base = trainer.log_dir if trainer.loggers and trainer.log_dir else trainer.default_root_dir
        return Path(base) / "fimoda"

    def _publish(self, report: AttributionReport, trainer: Trainer | None, directory: Path) -> None:
        from .evaluation.plotting import render_figures, save_figures

        clear_previous_report(directory)
        report.save(directory)
        self.report_dir = directory
        figures = render_figures(report) if (self.plots or self.log) else {}
        if self.plots:
            save_figures(figures, directory)
        if self.log and trainer is not None and trainer.loggers:
            log_report(trainer.loggers, report, figures, step=trainer.global_step)
        if self.print_summary:
            print(report.summary(), flush=True)
            print(f"FiMODA report: {directory}", flush=True)


@contextlib.contextmanager
def _barrier_after(trainer: Trainer | None) -> Iterator[None]:
    """Other ranks wait for rank 0's report, also when rank 0 fails (it then raises)."""
    try:
        yield
    finally:
        if trainer is not None:
            trainer.strategy.barrier("fimoda_attribution")
