"""``TrainingPlan``: one resolved further-training job — its data, schedule, units, engine, fingerprint.

Built by :func:`make_plan` from a :class:`FurtherTrainingConfig` and the job's arguments, it knows
how to split the job into units ``(seed, chunk of J)``, compute one unit and assemble the units into
a :class:`~lightning_fimoda.GoldStandard`. The test batch and the MLP kernel are built once per plan.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .._data import load_batch
from ..exceptions import ConfigurationError
from ..functional import FunctionalTask, eval_mode
from ..gold_standard import GoldStandard
from ..gradients.budget import describe_budget, resolve_memory_budget
from ..task import AttributionTask
from .config import FurtherTrainingConfig
from .engine import run_vectorised
from .fingerprint import job_fingerprint
from .mlp import MLPKernel
from .schedule import Schedule
from .sequential import run_sequential

__all__ = ["ENGINES", "TrainingPlan", "make_plan"]

ENGINES = ("auto", "mlp", "vectorised", "sequential")
_TRAIN_MODE_MODULES = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
Unit = tuple[int, int, list[int | None]]


@dataclass
class TrainingPlan:
    """A job ready to run: everything :meth:`compute` needs, no reference to the loop that made it."""

    config: FurtherTrainingConfig
    schedule: Schedule
    model: nn.Module
    task: AttributionTask
    fn: FunctionalTask
    train_dataset: Any
    test_dataset: Any
    loo_indices: Tensor
    test_indices: Tensor
    engine: str
    chunk_size: int
    device: torch.device
    fingerprint: dict[str, Any]
    memory: dict[str, Any] = field(default_factory=dict)
    _built: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def layout(self) -> dict[str, Any]:
        """How the job is cut into unit files (not part of the fingerprint)."""
        return {"engine": self.engine, "chunk_size": self.chunk_size}

    def with_layout(self, layout: dict[str, Any]) -> TrainingPlan:
        """This plan cut into units as ``layout`` says (a run directory's stored layout)."""
        chunk = int(layout["chunk_size"])
        memory = self.memory
        if chunk != self.chunk_size:
            memory = {**memory, "runs_per_unit": chunk + int(self.config.full_run), "chunk_source": "run_dir"}
        return dataclasses.replace(self, engine=layout["engine"], chunk_size=chunk, memory=memory, _built={})

    def units(self) -> list[Unit]:
        """``(seed, chunk, members)``; the first chunk of a seed also holds its full run (``None``)."""
        out = []
        for seed in self.config.seeds:
            for c, chunk in enumerate(self.loo_indices.split(self.chunk_size)):
                full: list[int | None] = [None] if self.config.full_run and c == 0 else []
                out.append((seed, c, full + chunk.tolist()))
        return out

    def _test_batch(self) -> Any:
        if "test_batch" not in self._built:
            self._built["test_batch"] = load_batch(self.task, self.test_dataset, self.test_indices, self.device)
            self._built["kernel"] = MLPKernel(self.model, self.task) if self.engine == "mlp" else None
        return self._built["test_batch"]

    def kernel_path(self) -> str | None:
        """The MLP kernel's path (:meth:`MLPKernel.path`) once built; ``None`` for other engines."""
        kernel = self._built.get("kernel")
        if kernel is None:
            return None
        return kernel.path(torch.empty(0, dtype=next(self.model.parameters()).dtype, device=self.device))

    def compute(
        self, seed: int, members: list[int | None], on_step: Callable[[int], None] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Measurements of one unit: ``loo [C, n_test, k]`` and ``full [C, n_test]`` (or ``None``)."""
        test_batch = self._test_batch()
        if self.engine in ("vectorised", "mlp"):
            out = run_vectorised(
                self.fn, self.schedule, seed, members, self.train_dataset, test_batch, self._built["kernel"],
                on_step, self.test_indices,
            )
        else:
            out = run_sequential(
                self.model, self.task, self.schedule, seed, members, self.train_dataset, test_batch, on_step,
                self.test_indices,
            )
        out = out.detach().cpu()
        if members[0] is None:
            return out[..., 1:].contiguous(), out[..., 0].contiguous()
        return out, None

    def gold_config(self) -> dict[str, Any]:
        """The configuration recorded with the gold standard: fingerprint, layout and dtype."""
        dtype = str(next(iter(self.fn.params.values())).dtype)
        return {**self.fingerprint, **self.layout, "dtype": dtype}

    def assemble(self, results: dict[tuple[int, int], tuple[Tensor, Tensor | None]]) -> GoldStandard:
        seeds = list(self.config.seeds)
        sample = next(iter(results.values()))[0]
        shape = (len(seeds), len(self.schedule.checkpoints), self.test_indices.numel(), self.loo_indices.numel())
        loo = torch.empty(shape, dtype=sample.dtype)
        full = torch.empty(shape[:3], dtype=sample.dtype) if self.config.full_run else None
        for (seed, chunk), (part, full_part) in results.items():
            s = seeds.index(seed)
            start = chunk * self.chunk_size
            loo[s, ..., start : start + part.shape[-1]] = part
            if full_part is not None:
                full[s] = full_part
        return GoldStandard(
            loo=loo,
            full=full,
            checkpoints=self.schedule.checkpoints,
            checkpoint_unit=self.config.checkpoint_unit,
            seeds=seeds,
            loo_indices=self.loo_indices.clone(),
            test_indices=self.test_indices.clone(),
            config=self.gold_config(),
        )


def make_plan(
    config: FurtherTrainingConfig,
    model: nn.Module,
    task: AttributionTask,
    train_dataset: Any,
    test_dataset: Any,
    loo_indices: Tensor,
    test_indices: Tensor,
    engine: str,
    chunk_size: int | None,
    memory_budget: int | None,
) -> TrainingPlan:
    """Resolve engine, chunk size and fingerprint of a validated job (indices already resolved)."""
    schedule = config.schedule(len(train_dataset))
    fn = FunctionalTask(model, task)
    device = next(iter(fn.params.values())).device
    example = load_batch(task, train_dataset, torch.tensor([0]), device)
    engine = resolve_engine(engine, model, task, example, config.train_mode)
    chunk, memory = _resolve_chunk(fn, example, schedule.batch_size, memory_budget, chunk_size,
                                   loo_indices.numel(), config.full_run)
    fingerprint = job_fingerprint(
        config.to_dict(), model, task, train_dataset, test_dataset, loo_indices, test_indices
    )
    return TrainingPlan(
        config, schedule, model, task, fn, train_dataset, test_dataset, loo_indices, test_indices,
        engine, chunk, device, fingerprint, memory,
    )


def resolve_engine(choice: str, model: nn.Module, task: AttributionTask, example: Any, train_mode: bool) -> str:
    """The engine to run (see :mod:`.loop`); warns when ``train_mode`` forces the sequential path."""
    culprits = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _TRAIN_MODE_MODULES)})
    if not (train_mode and culprits):
        if choice == "mlp":
            MLPKernel(model, task, example)  # raises with the reason when unsupported
        if choice != "auto":
            return choice
        return "mlp" if MLPKernel.unsupported(model, task, example) is None else "vectorised"
    if choice in ("vectorised", "mlp"):
        raise ConfigurationError(
            f"train_mode=True with {culprits} cannot run on the vectorised engine (their train-mode "
            "behaviour differs per run); use engine='sequential' or train_mode=False."
        )
    if choice == "auto":
        warnings.warn(
            f"FurtherTrainingLoop: train_mode=True with {culprits}: falling back to the sequential path "
            "(one model copy per run, much slower). train_mode=False trains in eval mode on the fast engine.",
            stacklevel=4,
        )
    return "sequential"


def _resolve_chunk(
    fn: FunctionalTask, example: Any, batch_size: int, memory_budget: int | None, chunk_size: int | None,
    m: int, full_run: bool,
) -> tuple[int, dict[str, Any]]:
    """LOO runs per unit, and how they were chosen (the ``memory`` entry of the run's info).

    Without ``chunk_size``: as many runs as fit the budget at :func:`run_bytes` each, one fewer to
    leave room for the full run that the first unit also trains, then spread evenly over the units
    (``m = 10`` at 6 per unit gives 5 + 5, not 6 + 4) so that the units take equally long.
    """
    device = next(iter(fn.params.values())).device
    budget = resolve_memory_budget(memory_budget, device)
    per_run = run_bytes(fn, example, batch_size)
    m = max(m, 1)
    if chunk_size is None:
        fit = max(1, budget // per_run - int(full_run))
        chunk = math.ceil(m / math.ceil(m / fit))
    else:
        chunk = min(chunk_size, m)
    return chunk, {
        "memory_budget": budget,
        "memory_budget_source": describe_budget(memory_budget, device),
        "bytes_per_run": per_run,
        "runs_per_unit": chunk + int(full_run),
        "chunk_source": "given" if chunk_size is not None else "memory budget",
    }


def run_bytes(fn: FunctionalTask, example: Any, batch_size: int) -> int:
    """Estimated bytes of one run on the vectorised engine (stated, not measured): its parameters,
    gradients, optimizer state and temporaries (8 copies of ``P``), plus the activations of ``b + 1``
    rows (every module's output, containers included: a generous count of what the backward keeps, ×3)."""
    count = 0

    def hook(_module, _inputs, output):
        nonlocal count
        count += sum(t.numel() for t in tree_leaves(output) if isinstance(t, Tensor))

    first = next(iter(fn.params.values()))
    handles = [m.register_forward_hook(hook) for m in fn.model.modules()]
    try:
        with torch.no_grad(), eval_mode(fn.model):
            fn.task.per_example_loss(fn.model, example)
    finally:
        for h in handles:
            h.remove()
    return first.element_size() * (8 * fn.num_params + 3 * (batch_size + 1) * count)
