"""``FiMODACallback``: attribute the fitted model at the end of ``trainer.fit``.

.. code-block:: python

    trainer = Trainer(callbacks=[FiMODACallback(
        estimators=["grad_dot", {"name": "cg", "damping": 1e-3}],
        gold={"optimizer": "sgd", "lr": 3e-2, "epochs": 5, "batch_size": 128, "seeds": 10},
        num_train=100, num_test=50,
    )])
    trainer.fit(model, datamodule=dm)
    callback.report.print_summary()

What happens at ``on_fit_end`` (or on demand with :meth:`FiMODACallback.attribute`):

1. the task comes from ``task=`` or ``module.attribution_task()``; the datasets from the callback's
   ``train_dataset`` / ``test_dataset``, else the datamodule's ``train_dataset`` / ``test_dataset``
   (``val_dataset``), else the datasets behind the trainer's train / test / validation dataloaders;
2. the scored training instances (also the leave-one-out set ``J`` of the gold standard) and test
   instances: given indices, a seeded random choice of ``num_train`` / ``num_test``, or all;
3. the gold standard (``FurtherTrainingLoop``) runs on every process (it shards its work under DDP);
   the estimators, the report, figures and logging run on global rank 0 only;
4. the module is used in eval mode on the strategy's root device; its training flags, ``requires_grad``
   flags, parameter and buffer values (and ``.grad``), device, and the torch (CPU and CUDA), numpy and
   Python random states are restored afterwards.

The result is :attr:`FiMODACallback.report` (an :class:`~lightning_fimoda.AttributionReport`, ``None``
on other ranks), saved with PNG figures under ``output_dir`` (default: ``<trainer.log_dir>/fimoda``),
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
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ._data import dataset_length, model_device_dtype, resolve_indices
from ._tb import log_report
from .attribute import build_estimators, run_estimators
from .estimators.base import Estimator
from .gold_standard import GoldStandard
from .gradients import DEFAULT_MEMORY_BUDGET
from .profiling import memory_kind
from .report import AttributionReport, library_versions
from .task import AttributionTask, resolve_task

__all__ = ["FiMODACallback", "preserved_state"]



@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Restore ``module`` (modes, grad flags, values, grads, device) and every global RNG on exit."""
    training = {m: m.training for m in module.modules()}
    params = dict(module.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    # copies on the CPU, so that a model on an accelerator does not need twice its memory there
    grads = {n: None if p.grad is None else p.grad.detach().to("cpu", copy=True) for n, p in params.items()}
    values = {n: t.detach().to("cpu", copy=True) for n, t in module.state_dict(keep_vars=True).items()}
    device = next((p.device for p in module.parameters()), None)
    rng = _rng_states()
    try:
        yield
    finally:
        if device is not None:
            module.to(device)
        with torch.no_grad():
            for name, tensor in module.state_dict(keep_vars=True).items():
                if name in values:
                    tensor.copy_(values[name])
        for name, p in params.items():
            p.requires_grad_(flags[name])
            p.grad = None if grads[name] is None else grads[name].to(p.device)
        for m, flag in training.items():
            m.training = flag
        _set_rng_states(rng)


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def _loader_dataset(loaders: Any) -> Any:
    """The dataset behind a dataloader, or behind the only dataloader of a collection."""
    if isinstance(loaders, DataLoader):
        return loaders.dataset
    found = []
    if isinstance(loaders, Mapping):
        found = [v for v in loaders.values() if isinstance(v, DataLoader)]
    elif isinstance(loaders, (list, tuple)):
        found = [v for v in loaders if isinstance(v, DataLoader)]
    return found[0].dataset if len(found) == 1 else None


def _datamodule_dataset(dm: Any, attributes: Sequence[str], hooks: Sequence[str]) -> Any:
    for attr in attributes:
        ds = getattr(dm, attr, None)
        if ds is not None:
            return ds
    for hook in hooks:
        method = getattr(dm, hook, None)
        if callable(method):
            try:
                ds = _loader_dataset(method())
            except Exception:  # noqa: BLE001 - a datamodule without this split raises its own errors
                continue
            if ds is not None:
                return ds
    return None


class FiMODACallback(Callback):
    """Final-model-only data attribution of the fitted model, evaluated against further training.

    Args:
        estimators: estimator names, ``{"name": ..., **kwargs}`` dicts (the YAML form) or built
            :class:`~lightning_fimoda.Estimator` objects.
        gold: ``None`` (no gold standard), a ``FurtherTrainingLoop``, or a dict of its keyword arguments
            without ``task`` (the YAML form; the task is the one resolved for the module).
        train_indices: training instances to score (and leave out in the gold standard).
        num_train: instead of ``train_indices``: a random choice of this many (seeded by ``seed``).
        test_indices: test instances to attribute.
        num_test: instead of ``test_indices``: a random choice of this many (seeded by ``seed``).
        seed: seed of those random choices.
        task: the attribution task (default: ``module.attribution_task()``).
        train_dataset, test_dataset: explicit datasets (default: from the trainer, see the module doc).
        output_dir: where the report and figures go (default: ``<trainer.log_dir>/fimoda``).
        log: log metrics, histograms, figures and a top-examples table to the trainer's loggers.
        plots: write PNG figures.
        print_summary: print the summary table.
        mislabeled: training-set indices whose labels were flipped (mislabel-detection AUC).
        seed_ks: group sizes for seed averaging (default 1, 2, 4, ... and the number of seeds).
        share_gradients: share one per-sample-gradient cache between estimators (faster; the first
            estimator's time and memory then include the gradients of all).
        memory_budget: bytes for one chunk of per-sample gradients.
        progress: show progress bars.
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
        share_gradients: bool = False,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        progress: bool = False,
    ) -> None:
        super().__init__()
        self.estimators = build_estimators(estimators)
        if gold is not None and not isinstance(gold, Mapping) and not callable(getattr(gold, "run", None)):
            raise TypeError(f"gold must be None, a FurtherTrainingLoop or a dict of its arguments, got {gold!r}.")
        if isinstance(gold, Mapping) and "task" in gold:
            raise ValueError("gold: leave out 'task'; the callback passes the task it resolved for the module.")
        self.gold = dict(gold) if isinstance(gold, Mapping) else gold
        for what, idx, num in (("train", train_indices, num_train), ("test", test_indices, num_test)):
            if idx is not None and num is not None:
                raise ValueError(f"Give {what}_indices or num_{what}, not both.")
            if num is not None and num < 1:
                raise ValueError(f"num_{what} must be >= 1, got {num}.")
        self.train_indices = train_indices
        self.num_train = num_train
        self.test_indices = test_indices
        self.num_test = num_test
        self.seed = seed
        if task is not None and not isinstance(task, AttributionTask):
            raise TypeError(f"task must be an AttributionTask, got {type(task).__name__}.")
        self.task = task
        self.train_dataset = train_dataset
        self.test_dataset = test_dataset
        self.output_dir = output_dir
        self.log = log
        self.plots = plots
        self.print_summary = print_summary
        self.mislabeled = None if mislabeled is None else [int(i) for i in mislabeled]
        self.seed_ks = None if seed_ks is None else [int(k) for k in seed_ks]
        self.share_gradients = share_gradients
        self.memory_budget = memory_budget
        self.progress = progress
        self.report: AttributionReport | None = None
        self._last_loop: Any = None
        self.report_dir: Path | None = None
        if isinstance(self.gold, dict):
            self._gold_loop(None)  # check the arguments now, not after training

    # -- Lightning hooks ---------------------------------------------------------------------------
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.fast_dev_run:
            rank_zero_info("FiMODACallback: skipped under fast_dev_run.")
            return
        self.attribute(trainer, pl_module)

    # -- the work ----------------------------------------------------------------------------------
    def attribute(
        self,
        trainer: Trainer | None,
        module: nn.Module,
        *,
        datamodule: LightningDataModule | None = None,
    ) -> AttributionReport | None:
        """Attribute ``module`` now; returns the report on global rank 0 (``None`` elsewhere)."""
        task = resolve_task(module, self.task)
        train_ds, test_ds = self.resolve_datasets(trainer, datamodule)
        train_idx, test_idx = self.resolve_indices(train_ds, test_ds)
        is_zero = trainer is None or trainer.is_global_zero
        device = trainer.strategy.root_device if trainer is not None else model_device_dtype(module)[0]
        gold, gold_seconds = None, None
        with _barrier_after(trainer), preserved_state(module), torch.enable_grad():
            module.to(device)
            if self.gold is not None:
                loop = self._last_loop = self._gold_loop(task)
                gold, gold_seconds = _timed(lambda: loop.run(module, train_ds, test_ds, train_idx, test_idx))
                if is_zero and not isinstance(gold, GoldStandard):
                    raise TypeError(f"The gold standard's run() returned {type(gold).__name__}, not a GoldStandard.")
            report = None
            if is_zero:
                runs = run_estimators(
                    module, task, train_ds, test_ds, self.estimators, train_idx, test_idx,
                    share_gradients=self.share_gradients, measure_memory=True,
                    memory_budget=self.memory_budget, progress=self.progress,
                )
                report = self._make_report(module, task, trainer, train_ds, test_ds, train_idx, test_idx, runs,
                                           gold, gold_seconds, device)
                self._publish(report, trainer)
        self.report = report
        return report

    def resolve_datasets(self, trainer: Trainer | None, datamodule: Any = None) -> tuple[Any, Any]:
        """``(train_dataset, test_dataset)`` in the order of precedence of the module doc."""
        dm = datamodule if datamodule is not None else getattr(trainer, "datamodule", None)
        train, test = self.train_dataset, self.test_dataset
        if train is None and dm is not None:
            train = _datamodule_dataset(dm, ["train_dataset"], ["train_dataloader"])
        if train is None and trainer is not None:
            train = _loader_dataset(_safe(lambda: trainer.train_dataloader))
        if test is None and dm is not None:
            test = _datamodule_dataset(dm, ["test_dataset", "val_dataset"], ["test_dataloader", "val_dataloader"])
        if test is None and trainer is not None:
            test = _loader_dataset(_safe(lambda: trainer.test_dataloaders))
            if test is None:
                test = _loader_dataset(_safe(lambda: trainer.val_dataloaders))
        missing = [name for name, ds in (("train_dataset", train), ("test_dataset", test)) if ds is None]
        if missing:
            raise ValueError(
                f"FiMODACallback could not find the {' and '.join(missing)}: pass it to FiMODACallback(...), "
                "give the datamodule a train_dataset / test_dataset attribute, or fit with a single "
                "train / validation dataloader."
            )
        return train, test

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
                    raise ValueError(f"Asked for {num} {what} instances but the {what} dataset has {n}.")
                idx = torch.randperm(n, generator=gen)[:num].sort().values
            out.append(resolve_indices(ds, idx, what))
        if self.mislabeled is not None:
            flagged = sum(int(i) in set(self.mislabeled) for i in out[0].tolist())
            if not 0 < flagged < out[0].numel():
                raise ValueError(
                    f"mislabeled: {flagged} of the {out[0].numel()} scored training instances are flagged; "
                    "mislabel detection needs both flipped and clean ones among them."
                )
        if self.gold is not None and out[0].numel() > 200:
            rank_zero_warn(
                f"FiMODACallback: the gold standard will leave out each of {out[0].numel()} training instances; "
                "set num_train (the paper uses 50-100) to keep further training affordable."
            )
        return out[0], out[1]

    def _gold_loop(self, task: AttributionTask | None) -> Any:
        if not isinstance(self.gold, dict):
            return self.gold
        from .further_training import FurtherTrainingLoop

        return FurtherTrainingLoop(task, **{"progress": self.progress, **self.gold})

    def _make_report(
        self, module, task, trainer, train_ds, test_ds, train_idx, test_idx, runs, gold, gold_seconds, device
    ) -> AttributionReport:
        info: dict[str, Any] = {
            "model": type(module).__name__,
            "task": repr(task),
            "train_dataset_size": dataset_length(train_ds, "training"),
            "test_dataset_size": dataset_length(test_ds, "test"),
            "device": str(device),
            "gradients_shared_between_estimators": self.share_gradients,
        }
        if trainer is not None:
            info["trained_epochs"] = trainer.current_epoch
            info["trained_steps"] = trainer.global_step
        if gold_seconds is not None:
            info["gold_standard_seconds"] = round(gold_seconds, 3)
            info["gold_standard_run"] = getattr(self._last_loop, "info", {})
        info["versions"] = library_versions()
        mislabeled = None
        if self.mislabeled is not None:
            flipped = set(self.mislabeled)
            mislabeled = torch.tensor([int(i) in flipped for i in train_idx.tolist()])
        return AttributionReport(
            scores={run.label: run.scores for run in runs},
            train_indices=train_idx,
            test_indices=test_idx,
            gold=gold,
            seconds={run.label: run.seconds for run in runs},
            peak_memory={run.label: run.peak_memory for run in runs},
            memory_kind=memory_kind(torch.device(device)),
            settings={run.label: run.settings for run in runs},
            mislabeled=mislabeled,
            seed_ks=self.seed_ks,
            info=info,
        )

    def _output_dir(self, trainer: Trainer | None) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        if trainer is None:
            return Path("fimoda")
        base = trainer.log_dir if trainer.loggers and trainer.log_dir else trainer.default_root_dir
        return Path(base) / "fimoda"

    def _publish(self, report: AttributionReport, trainer: Trainer | None) -> None:
        from .plotting import render_figures, save_figures

        directory = self._output_dir(trainer)
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
    """Other ranks wait for rank 0's estimators and report, also when rank 0 fails (it then raises)."""
    try:
        yield
    finally:
        if trainer is not None:
            trainer.strategy.barrier("fimoda_attribution")


def _safe(get: Any) -> Any:
    try:
        return get()
    except Exception:  # noqa: BLE001 - a trainer property that is not available yet
        return None


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
