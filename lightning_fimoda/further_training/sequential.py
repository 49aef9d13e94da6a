"""The naive reference path: one deep copy of the model and one ``torch.optim`` optimizer per run.

It is the oracle the vectorised engine is tested against, and the fallback for models the engine
cannot batch (dropout or BatchNorm when training in train mode). Written independently of the engine:
it walks each run's own batches (``epoch_permutation`` minus ``j`` for ``drop``) with a plain loop.

In train mode, ``torch``'s global generator is re-seeded from ``(seed, step)`` before each step's
forward pass, so the full run and every LOO run of a seed draw the same dropout masks for the shared
batch (common random numbers); the caller's RNG state is restored afterwards.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._data import load_batch
from ..functional import eval_mode
from ..task import AttributionTask
from .spec import TrainingSpec, epoch_permutation

__all__ = ["run_sequential"]


def run_sequential(
    model: nn.Module,
    task: AttributionTask,
    spec: TrainingSpec,
    seed: int,
    members: list[int | None],
    train_dataset: Any,
    test_batch: Any,
    train_mode: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> Tensor:
    """Measurements ``[C, n_test, K]`` of each member run (``None`` = full run, ``j`` = leave out ``j``).

    ``on_step(1)`` is called after every optimizer step (progress).
    """
    device = next(model.parameters()).device
    cols = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for j in members:
            cols.append(
                _one_run(model, task, spec, seed, j, train_dataset, test_batch, train_mode, device, on_step)
            )
    return torch.stack(cols, dim=-1)


def _one_run(model, task, spec, seed, j, dataset, test_batch, train_mode, device, on_step) -> Tensor:
    net = copy.deepcopy(model)
    net.train(train_mode)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = spec.optimizer.torch_optimizer(params)
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
                loss = loss - task.per_example_loss(net, z_j).sum() / spec.n
            if not torch.isfinite(loss):
                run = "the full run" if j is None else f"the run leaving out training index {j}"
                raise FloatingPointError(
                    f"Non-finite further-training loss ({loss.item()}) at seed {seed}, step {step + 1}, in "
                    f"{run}. Lower lr or set grad_clip."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            opt.step()
            step += 1
            if on_step is not None:
                on_step(1)
            if spec.eval_every != "epoch" and (step % spec.eval_every == 0 or step == spec.total_steps):
                measured.append(_measure(net, task, test_batch))
        if spec.eval_every == "epoch":
            measured.append(_measure(net, task, test_batch))
        if total is not None and step == total:
            break
    return torch.stack(measured)


def _measure(net: nn.Module, task: AttributionTask, test_batch: Any) -> Tensor:
    with eval_mode(net), torch.no_grad():
        return task.measurement(net, test_batch).detach()
