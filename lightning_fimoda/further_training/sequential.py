"""The naive reference path: one deep copy of the model and one ``torch.optim`` optimizer per run.

It is the oracle the vectorised engine is tested against, and the fallback for models the engine
cannot batch (dropout or BatchNorm when training in train mode). Written independently of the engine:
it walks each run's own batches (``epoch_permutation`` minus ``j`` for ``drop``) with a plain loop.

In train mode, ``torch``'s global generator is re-seeded from ``(seed, step)`` before each step's
forward pass, so the full run and every LOO run of a seed draw the same dropout masks for the shared
batch (common random numbers); the caller's RNG state is restored afterwards. Every run trains its
own deep copy, so BatchNorm's running statistics are updated by that run's batches only. The
subtracted term ``ℓ(z_j)`` of ``subtract`` runs through BatchNorm on its running statistics without
updating them: ``z_j`` alone has no batch statistics to speak of (none at all behind a 1x1 feature
map), and its single-example statistics must not leak into the run's running averages.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._data import load_batch
from ..functional import eval_mode
from ..task import AttributionTask
from .checks import check_loss_finite, check_measurements_finite
from .optimizers import StackedOptimizer
from .schedule import Schedule, epoch_permutation

__all__ = ["run_sequential"]


def run_sequential(
    model: nn.Module,
    task: AttributionTask,
    spec: Schedule,
    seed: int,
    members: list[int | None],
    train_dataset: Any,
    test_batch: Any,
    on_step: Callable[[int], None] | None = None,
    test_indices: Tensor | None = None,
) -> Tensor:
    """Measurements ``[C, n_test, K]`` of each member run (``None`` = full run, ``j`` = leave out ``j``).

    Trains in train mode when ``spec.train_mode``. ``on_step(1)`` is called after every optimizer
    step (progress); ``test_indices`` name ``test_batch``'s rows in errors.
    """
    device = next(model.parameters()).device
    cols = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for j in members:
            measure = _Measure(task, test_batch, seed, j, test_indices)
            cols.append(_one_run(model, task, spec, seed, j, train_dataset, measure, device, on_step))
    return torch.stack(cols, dim=-1)


def _one_run(model, task, spec, seed, j, dataset, measure, device, on_step) -> Tensor:
    train_mode = spec.train_mode
    net = copy.deepcopy(model)
    net.train(train_mode)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = StackedOptimizer(spec.config).torch_optimizer(params)
    z_j = load_batch(task, dataset, torch.tensor([j]), device) if j is not None else None
    total = spec.total_steps if spec.steps is not None else None
    measured: list[Tensor] = []
    step = 0
    for epoch in itertools.count():
        if spec.epochs is not None and epoch == spec.epochs:
            break
        perm = epoch_permutation(seed, epoch, spec.n)
        if spec.leave_out == "drop" and j is not None:
            perm = perm[perm != j]
        for idx in perm.split(spec.batch_size):
            if total is not None and step == total:
                break
            if train_mode:
                torch.manual_seed(int(np.random.SeedSequence([seed, step, 7]).generate_state(1)[0]))
            batch = load_batch(task, dataset, idx, device)
            loss = task.per_example_loss(net, batch).mean()
            if spec.leave_out == "subtract" and j is not None:
                with _running_statistics(net, train_mode):
                    loss = loss - task.per_example_loss(net, z_j).sum() / spec.n
            check_loss_finite(loss.detach(), None, seed, step + 1, [j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            opt.step()
            step += 1
            if on_step is not None:
                on_step(1)
            if spec.eval_every != "epoch" and (step % spec.eval_every == 0 or step == spec.total_steps):
                measured.append(measure(net, step))
        if spec.eval_every == "epoch":
            measured.append(measure(net, step))
        if total is not None and step == total:
            break
    return torch.stack(measured)


@contextlib.contextmanager
def _running_statistics(net: nn.Module, train_mode: bool) -> Iterator[None]:
    """BatchNorm layers of ``net`` in eval mode inside the block (when training in train mode)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if train_mode else []
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


class _Measure:
    """``f`` on the test batch after a step of one run, checked finite."""

    def __init__(self, task: AttributionTask, test_batch: Any, seed: int, j: int | None, test_indices) -> None:
        self.task, self.test_batch, self.seed, self.j, self.test_indices = task, test_batch, seed, j, test_indices

    def __call__(self, net: nn.Module, step: int) -> Tensor:
        with eval_mode(net), torch.no_grad():
            values = self.task.measurement(net, self.test_batch).detach()
        check_measurements_finite(values.unsqueeze(1), self.seed, step, [self.j], self.test_indices)
        return values
