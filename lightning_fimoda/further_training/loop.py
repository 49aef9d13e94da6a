"""``FurtherTrainingLoop``: the leave-one-out further-training gold standard (SPEC §2).

For every seed ``s`` and every ``j ∈ J`` the final model ``θ̂`` is trained further without ``z_j``
(``subtract`` or ``drop``), with a fresh optimizer and the seed's sample order, and ``f`` is measured
on the chosen test instances at every checkpoint; the full-data run of each seed is added when the
``full`` adjustment is requested. The result is a :class:`~lightning_fimoda.GoldStandard`.

Work is split into units ``(seed, chunk of J)``; each unit is one call of an engine:

- ``"vectorised"`` (:mod:`.engine`): the chunk's runs trained at once with stacked parameters,
  gradients by ``torch.func.vmap(grad)`` of the task (any model the task can run under ``vmap``);
- ``"mlp"``: the same engine with hand-written batched-matmul gradients (:mod:`.mlp`) for
  ``nn.Sequential`` MLPs with a ``SupervisedTask`` — ``"auto"`` picks it whenever it applies;
- ``"sequential"`` (:mod:`.sequential`): one model copy and ``torch.optim`` per run — the oracle, and
  the fallback when ``train_mode=True`` meets dropout or BatchNorm (their train-mode behaviour cannot
  be batched; dropout masks are then shared per seed and step as far as possible).

By default further training runs with the model in **eval mode** (dropout off, BatchNorm on its
running statistics): deterministic, identical across runs, and what the paper's MLPs do anyway.

Units are written to ``run_dir`` as they finish (resume by calling ``run`` again) and are dealt out
over the ranks of a ``torch.distributed`` job (see :mod:`.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .._data import dataset_length, load_batch, resolve_indices
from ..functional import FunctionalTask, eval_mode
from ..gold_standard import GoldStandard
from ..task import AttributionTask, resolve_task
from .distributed import all_gather, rank_and_world, shard
from .engine import run_vectorised
from .mlp import MLPKernel
from .optimizers import OptimizerConfig
from .sequential import run_sequential
from .spec import TrainingSpec
from .store import RunStore

__all__ = ["CostEstimate", "FurtherTrainingLoop"]

ENGINES = ("auto", "mlp", "vectorised", "sequential")
ADJUSTMENTS = ("mean", "full")
_TRAIN_MODE_MODULES = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


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
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"`` (fresh state for every run).
        lr: learning rate (> 0; typically 10x smaller than the original training's).
        epochs / steps: length of every run, exactly one of them.
        batch_size: mini-batch size ``b``.
        seeds: number of seeds ``S`` (seeds ``0..S-1``) or an explicit list; a seed fixes the sample
            order of its full and LOO runs (common random numbers).
        leave_out: ``"subtract"`` (``L_B = mean_B ℓ − ℓ_j / n`` in every batch) or ``"drop"``
            (``j`` removed from the permutation).
        eval_every: ``"epoch"`` or a number of steps ``k`` (checkpoints ``k, 2k, ...`` and the last step).
        weight_decay, momentum, betas, eps: optimizer hyperparameters as in ``torch.optim``
            (``momentum`` for SGD; Adam's decay is L2, AdamW's decoupled).
        grad_clip: max global gradient norm per run, applied after the subtraction; ``None``: off.
        adjustments: which gold-standard adjustments to support; the full-data run is made only when
            ``"full"`` is among them.
        run_dir: directory to store finished units in and resume from; ``None``: keep in memory.
        progress: show a progress bar (optimizer steps of all runs, with ETA; units done as postfix).
        engine: ``"auto"`` (``"mlp"`` when the model is a plain MLP, else ``"vectorised"``),
            ``"mlp"``, ``"vectorised"`` or ``"sequential"`` (see the module docstring).
        chunk_size: LOO runs per unit; ``None``: as many as fit ``memory_budget`` bytes.
        train_mode: train with the model in train mode (dropout on); default eval mode.

    Example::

        loop = FurtherTrainingLoop(SupervisedTask("mse"), lr=3e-2, epochs=50, batch_size=128, seeds=10,
                                   run_dir="runs/gold")
        print(loop.estimate(model, train, test, loo_indices=list(range(100))))  # dry run
        gold = loop.run(model, train, test, loo_indices=list(range(100)))
        gold.scores("mean")  # [epochs, n_test, 100]; positive = z_j helps f(x)
    """

    def __init__(
        self,
        task: AttributionTask | None = None,
        *,
        optimizer: str = "sgd",
        lr: float,
        epochs: int | None = None,
        steps: int | None = None,
        batch_size: int = 128,
        seeds: int | Sequence[int] = 1,
        leave_out: str = "subtract",
        eval_every: str | int = "epoch",
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        grad_clip: float | None = None,
        adjustments: Sequence[str] = ADJUSTMENTS,
        run_dir: str | Path | None = None,
        progress: bool = True,
        engine: str = "auto",
        chunk_size: int | None = None,
        memory_budget: int = 1 << 30,
        train_mode: bool = False,
    ) -> None:
        self.task = task
        self.optimizer = OptimizerConfig(optimizer, lr, weight_decay, momentum, tuple(betas), eps)
        self.epochs, self.steps, self.batch_size = epochs, steps, batch_size
        self.leave_out, self.eval_every, self.grad_clip = leave_out, eval_every, grad_clip
        # validates everything that does not depend on the data
        TrainingSpec(self.optimizer, None, batch_size, epochs, steps, eval_every, leave_out, grad_clip)
        self.seeds = _resolve_seeds(seeds)
        adjustments = (adjustments,) if isinstance(adjustments, str) else tuple(adjustments)
        bad = [a for a in adjustments if a not in ADJUSTMENTS]
        if bad or not adjustments:
            raise ValueError(f"adjustments must be a non-empty subset of {ADJUSTMENTS}, got {adjustments!r}.")
        self.adjustments = adjustments
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}.")
        if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
            raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}.")
        if not memory_budget > 0:
            raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget!r}.")
        self.engine, self.chunk_size, self.memory_budget = engine, chunk_size, memory_budget
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress, self.train_mode = progress, train_mode
        self.info: dict[str, Any] = {}

    @property
    def full_run(self) -> bool:
        """Whether the full-data run is made (only the ``full`` adjustment needs it)."""
        return "full" in self.adjustments

    # -- public entry points ----------------------------------------------------------------------
    def check(self, model: nn.Module, train_dataset: Any, test_dataset: Any, train_idx: Any, test_idx: Any) -> None:
        """Cheap validation before any expensive work (stand-in until the owner's version lands)."""

    def run(
        self,
        model: nn.Module,
        train_dataset: Any,
        test_dataset: Any,
        loo_indices: Sequence[int] | Tensor,
        test_indices: Sequence[int] | Tensor | None = None,
    ) -> GoldStandard:
        """Train every run and return the measurements as a :class:`GoldStandard`.

        ``loo_indices``: the set ``J`` (training indices, ``[m]``); ``test_indices``: test instances to
        measure (default: all). Under ``torch.distributed`` every rank must call this; all return the
        same result. ``self.info`` then holds ``units_computed`` / ``units_loaded`` and the engine used.
        """
        job = self._prepare(model, train_dataset, test_dataset, loo_indices, test_indices)
        rank, world = rank_and_world()
        store = None
        if self.run_dir is not None:
            store = RunStore(self.run_dir)
            error = None
            if rank == 0:
                try:
                    store.bind(job.config)
                except ValueError as err:
                    error = str(err)
            errors = [e for e in all_gather(error) if e]  # also a barrier: the directory is bound
            if errors:
                raise ValueError(errors[0])
        units = job.units()
        done = [u for u in units if store is not None and store.has(u[0], u[1])]
        done = all_gather(done)[0]  # rank 0's view, taken before anyone writes
        pending = [u for u in units if u not in done]
        mine = shard(pending, rank, world)

        results: dict[tuple[int, int], tuple[Tensor, Tensor | None]] = {}
        error = None
        # progress over this rank's optimizer steps of all runs (ETA), with the units done as postfix
        bar = tqdm(
            total=sum(job.spec.run_steps(excluded=j is not None) for u in mine for j in u[2]),
            desc="further training",
            unit="run-step",
            unit_scale=True,
            disable=not self.progress or rank != 0,
        )
        try:
            for done_units, (seed, chunk, members) in enumerate(mine, start=1):
                start = time.perf_counter()
                loo, full = job.compute(seed, members, bar.update)
                if store is not None:
                    store.save(seed, chunk, loo, full, time.perf_counter() - start, rank)
                results[(seed, chunk)] = (loo, full)
                bar.set_postfix_str(f"units {done_units}/{len(mine)}")
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            if world == 1:
                raise
            error = f"rank {rank}: {type(err).__name__}: {err}"
        finally:
            bar.close()
        gathered = all_gather((results, error))
        errors = [e for _, e in gathered if e]
        if errors:
            raise RuntimeError("Further training failed on " + "; ".join(errors))
        for part, _ in gathered:
            results.update(part)
        for seed, chunk, _ in done:
            results[(seed, chunk)] = store.load(seed, chunk)
        self.info = {
            "engine": job.engine,
            "chunk_size": job.chunk_size,
            "units": len(units),
            "units_computed": len(pending),
            "units_loaded": len(done),
        }
        gold = job.assemble(results)
        if store is not None and rank == 0:
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
        job = self._prepare(model, train_dataset, test_dataset, loo_indices, test_indices)
        spec, m, s = job.spec, job.loo_indices.numel(), len(self.seeds)
        per_loo = _examples(spec, excluded=True)
        per_full = _examples(spec, excluded=False)
        if spec.leave_out == "subtract":
            per_loo += spec.total_steps  # the subtracted ℓ_j of every step
        runs = s * (m + int(self.full_run))
        return CostEstimate(
            runs=runs,
            units=len(job.units()),
            chunk_size=job.chunk_size,
            steps_per_run=spec.total_steps,
            sample_gradients=s * (m * per_loo + int(self.full_run) * per_full),
            measurements=runs * len(spec.checkpoints) * job.test_indices.numel(),
        )

    def settings(self) -> dict[str, Any]:
        """The configuration as JSON-serialisable values."""
        return {
            "optimizer": self.optimizer.to_dict(),
            "epochs": self.epochs,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "seeds": self.seeds,
            "leave_out": self.leave_out,
            "eval_every": self.eval_every,
            "grad_clip": self.grad_clip,
            "adjustments": list(self.adjustments),
            "train_mode": self.train_mode,
        }

    def __repr__(self) -> str:
        return f"FurtherTrainingLoop({json.dumps(self.settings())})"

    # -- internals --------------------------------------------------------------------------------
    def _prepare(self, model, train_dataset, test_dataset, loo_indices, test_indices) -> _Job:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        task = resolve_task(model, self.task)
        n = dataset_length(train_dataset, "training")
        spec = TrainingSpec(
            self.optimizer,
            n,
            self.batch_size,
            self.epochs,
            self.steps,
            self.eval_every,
            self.leave_out,
            self.grad_clip,
        )
        loo_idx = resolve_indices(train_dataset, loo_indices, "LOO (training)")
        test_idx = resolve_indices(test_dataset, test_indices, "test")
        fn = FunctionalTask(model, task)
        device = next(iter(fn.params.values())).device
        engine = self._resolve_engine(model, task, load_batch(task, train_dataset, torch.tensor([0]), device))
        chunk = self.chunk_size or _chunk_for_budget(fn, train_dataset, spec, self.memory_budget)
        chunk = min(chunk, loo_idx.numel())
        config = {
            "further_training": self.settings(),
            "n_train": n,
            "engine": engine,
            "chunk_size": chunk,
            "loo_indices": loo_idx.tolist(),
            "test_indices": test_idx.tolist(),
            "dtype": str(next(iter(fn.params.values())).dtype),
            "model_digest": _digest(list(model.state_dict().values())),
            "train_digest": _dataset_digest(train_dataset),
            "test_digest": _dataset_digest(test_dataset),
        }
        return _Job(
            self,
            model,
            task,
            fn,
            spec,
            train_dataset,
            test_dataset,
            loo_idx,
            test_idx,
            engine,
            chunk,
            config,
            device,
        )

    def _resolve_engine(self, model: nn.Module, task: AttributionTask, example: Any) -> str:
        culprits = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _TRAIN_MODE_MODULES)})
        if not (self.train_mode and culprits):
            if self.engine == "mlp":
                MLPKernel(model, task, example)  # raises with the reason when unsupported
            if self.engine != "auto":
                return self.engine
            return "mlp" if MLPKernel.unsupported(model, task, example) is None else "vectorised"
        if self.engine in ("vectorised", "mlp"):
            raise ValueError(
                f"train_mode=True with {culprits} cannot run on the vectorised engine (their train-mode "
                "behaviour differs per run); use engine='sequential' or train_mode=False."
            )
        if self.engine == "auto":
            warnings.warn(
                f"FurtherTrainingLoop: train_mode=True with {culprits}: falling back to the sequential path "
                "(one model copy per run, much slower). train_mode=False trains in eval mode on the fast engine.",
                stacklevel=3,
            )
        return "sequential"


@dataclass
class _Job:
    """One resolved ``run()`` call: data, spec, units, and how to compute and assemble them."""

    loop: FurtherTrainingLoop
    model: nn.Module
    task: AttributionTask
    fn: FunctionalTask
    spec: TrainingSpec
    train_dataset: Any
    test_dataset: Any
    loo_indices: Tensor
    test_indices: Tensor
    engine: str
    chunk_size: int
    config: dict[str, Any]
    device: torch.device

    def units(self) -> list[tuple[int, int, list[int | None]]]:
        """``(seed, chunk, members)``; the first chunk of a seed also holds its full run (``None``)."""
        out = []
        for seed in self.loop.seeds:
            for c, chunk in enumerate(self.loo_indices.split(self.chunk_size)):
                full: list[int | None] = [None] if self.loop.full_run and c == 0 else []
                out.append((seed, c, full + chunk.tolist()))
        return out

    def compute(
        self, seed: int, members: list[int | None], on_step: Callable[[int], None] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Measurements of one unit: ``loo [C, n_test, k]`` and ``full [C, n_test]`` (or ``None``)."""
        test_batch = load_batch(self.task, self.test_dataset, self.test_indices, self.device)
        if self.engine in ("vectorised", "mlp"):
            kernel = MLPKernel(self.model, self.task) if self.engine == "mlp" else None
            out = run_vectorised(
                self.fn, self.spec, seed, members, self.train_dataset, test_batch, kernel, on_step
            )
        else:
            out = run_sequential(
                self.model,
                self.task,
                self.spec,
                seed,
                members,
                self.train_dataset,
                test_batch,
                self.loop.train_mode,
                on_step,
            )
        out = out.detach().cpu()
        if members[0] is None:
            return out[..., 1:].contiguous(), out[..., 0].contiguous()
        return out, None

    def assemble(self, results: dict[tuple[int, int], tuple[Tensor, Tensor | None]]) -> GoldStandard:
        seeds = self.loop.seeds
        sample = next(iter(results.values()))[0]
        shape = (len(seeds), len(self.spec.checkpoints), self.test_indices.numel(), self.loo_indices.numel())
        loo = torch.empty(shape, dtype=sample.dtype)
        full = torch.empty(shape[:3], dtype=sample.dtype) if self.loop.full_run else None
        for (seed, chunk), (part, full_part) in results.items():
            s = seeds.index(seed)
            start = chunk * self.chunk_size
            loo[s, ..., start : start + part.shape[-1]] = part
            if full_part is not None:
                full[s] = full_part
        return GoldStandard(
            loo=loo,
            full=full,
            checkpoints=self.spec.checkpoints,
            checkpoint_unit=self.spec.checkpoint_unit,
            seeds=list(seeds),
            loo_indices=self.loo_indices.clone(),
            test_indices=self.test_indices.clone(),
            config=self.config,
        )


def _resolve_seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, bool):
        raise TypeError("seeds must be a positive integer or a list of integers.")
    if isinstance(seeds, int):
        if seeds <= 0:
            raise ValueError(f"seeds must be >= 1 (the number of seeds), got {seeds}.")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise ValueError("seeds must not be empty.")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds contain duplicates: {out}.")
    if any(s < 0 for s in out):
        raise ValueError(f"seeds must be non-negative integers, got {out}.")
    return out


def _examples(spec: TrainingSpec, excluded: bool) -> int:
    """Training examples a run processes (rows of all its batches)."""
    size = spec.n - 1 if excluded and spec.leave_out == "drop" else spec.n
    if spec.epochs is not None:
        return spec.epochs * size
    per_epoch = spec.steps_per_epoch(excluded)
    full, rest = divmod(spec.steps, per_epoch)
    return full * size + min(rest * spec.batch_size, size)


def _chunk_for_budget(fn: FunctionalTask, dataset: Any, spec: TrainingSpec, budget: int) -> int:
    """LOO runs per unit that fit ``budget`` bytes: parameters, gradients, optimizer state and
    temporaries (8 copies of ``P``), plus the activations of ``b + 1`` rows (forward and backward)."""
    count = 0

    def hook(_module, _inputs, output):
        nonlocal count
        count += sum(t.numel() for t in tree_leaves(output) if isinstance(t, Tensor))

    first = next(iter(fn.params.values()))
    batch = load_batch(fn.task, dataset, torch.tensor([0]), first.device)
    handles = [m.register_forward_hook(hook) for m in fn.model.modules()]
    try:
        with torch.no_grad(), eval_mode(fn.model):
            fn.task.per_example_loss(fn.model, batch)
    finally:
        for h in handles:
            h.remove()
    per_member = first.element_size() * (8 * fn.num_params + 3 * (spec.batch_size + 1) * count)
    return max(1, budget // per_member)


def _digest(tensors: list[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _dataset_digest(dataset: Any) -> str:
    """Content hash of a ``TensorDataset``; for other datasets only their length is recorded."""
    if isinstance(dataset, TensorDataset):
        return _digest(list(dataset.tensors))
    return f"len={len(dataset)}"
