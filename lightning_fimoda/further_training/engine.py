"""The vectorised engine: ``K`` further-training runs of one seed trained at once (SPEC §2).

The ``K`` members (leave-one-out runs, plus the full run when it is needed) hold stacked parameters
``{name: [K, *shape]}``; one optimizer step is ``vmap(grad(L_k))`` over the stack (or, for plain MLPs,
the batched matrix products of :mod:`.mlp`) followed by the functional optimizer of :mod:`.optimizers`.
Per-member losses:

- ``subtract``: every member sees the same batch ``B``:
  ``L_k = mean_{i∈B} ℓ(z_i; θ_k) − c_k ℓ(z_{j_k}; θ_k)`` with ``c_k = 1/n`` (``0`` for the full run);
- ``drop``: member ``k`` walks the seed's permutation with ``j_k`` removed, so its batch is its own:
  ``L_k = Σ_r w_{kr} ℓ(z_{idx_{kr}}; θ_k)``, ``w = 1/|B_k|`` on real rows and ``0`` on padding. A member
  whose epoch has one batch fewer sits that round out (``active[k] = False``).

Training runs with the model in eval mode (dropout off, BatchNorm on its running statistics); the
loop sends models whose train mode differs from that to the sequential path instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_map

from .._data import load_batch
from ..functional import FunctionalTask, eval_mode
from .checks import check_loss_finite, check_measurements_finite
from .mlp import MLPKernel
from .optimizers import StackedOptimizer, clip_grad_norm
from .schedule import Schedule, epoch_permutation

__all__ = ["run_vectorised"]


@dataclass
class _Round:
    """One lockstep optimizer step of all members.

    ``shared``: batch indices ``[b']`` used by every member (``subtract``), or ``None``;
    ``idx``/``weight``: per-member rows ``[K, b]`` and loss weights (``drop``), or ``None``;
    ``active``: ``[K]`` bool, or ``None`` (all step); ``checkpoint``: evaluate ``f`` after this step.
    """

    shared: Tensor | None
    idx: Tensor | None
    weight: Tensor | None
    active: Tensor | None
    checkpoint: bool


def run_vectorised(
    fn: FunctionalTask,
    spec: Schedule,
    seed: int,
    members: list[int | None],
    train_dataset: Any,
    test_batch: Any,
    kernel: MLPKernel | None = None,
    on_step: Callable[[int], None] | None = None,
    test_indices: Tensor | None = None,
) -> Tensor:
    """Measurements ``[C, n_test, K]`` of the member runs (``None`` = full run, ``j`` = leave out ``j``).

    ``kernel``: hand-written batched gradients (and test measurements) for supported MLPs; ``None``:
    ``vmap(grad)`` (and ``vmap``) of the task.
    ``on_step(k)``: called after every round with the number of runs that stepped (progress).
    ``test_indices``: dataset indices of ``test_batch``'s rows (named when a measurement is not finite).
    """
    k = len(members)
    device = next(iter(fn.params.values())).device
    params = {n: p.detach().unsqueeze(0).repeat(k, *([1] * p.dim())) for n, p in fn.params.items()}
    optimizer = StackedOptimizer(spec.config)
    state = optimizer.init(params)
    step_grad = _gradient_fn(fn, spec, members, train_dataset, params, kernel)
    measure = kernel.measurement if kernel is not None else vmap(fn.measurement, in_dims=(0, None))

    measured: list[Tensor] = []
    with eval_mode(fn.model):
        for step, rnd in enumerate(_rounds(spec, seed, members), start=1):
            grads, loss = step_grad(rnd)
            check_loss_finite(loss, rnd.active, seed, step, members)
            if spec.grad_clip is not None:
                grads = clip_grad_norm(grads, spec.grad_clip)
            active = rnd.active.to(device) if rnd.active is not None else None
            optimizer.step(params, grads, state, active)
            if on_step is not None:
                on_step(k if active is None else int(active.sum()))
            if rnd.checkpoint:
                with torch.no_grad():
                    measured.append(measure(params, test_batch).T.detach())
                check_measurements_finite(measured[-1], seed, step, members, test_indices)
    return torch.stack(measured)


def _gradient_fn(
    fn: FunctionalTask,
    spec: Schedule,
    members: list[int | None],
    train_dataset: Any,
    params: dict[str, Tensor],
    kernel: MLPKernel | None,
) -> Callable[[_Round], tuple[dict[str, Tensor], Tensor]]:
    """``round -> (gradients {name: [K, ...]}, losses [K])`` of every member at the current ``params``."""
    task, k = fn.task, len(members)
    first = next(iter(params.values()))
    device, dtype = first.device, first.dtype
    is_loo = torch.tensor([j is not None for j in members], device=device)
    j_vec = torch.tensor([j if j is not None else 0 for j in members])

    if spec.leave_out == "subtract":
        z_j = load_batch(task, train_dataset, j_vec, device)
        coef = is_loo.to(dtype) / spec.n
    if kernel is not None:
        if spec.leave_out == "subtract":
            z_x, z_y = kernel.unpack(z_j)

        def step_grad(rnd: _Round) -> tuple[dict[str, Tensor], Tensor]:
            if rnd.shared is not None:
                x, y = kernel.unpack(load_batch(task, train_dataset, rnd.shared, device))
                b = x.shape[0]
                x = torch.cat([x.expand(k, *x.shape), z_x.unsqueeze(1)], dim=1)
                y = torch.cat([y.expand(k, *y.shape), z_y.unsqueeze(1)], dim=1)
                w = torch.cat(
                    [torch.full((k, b), 1.0 / b, dtype=dtype, device=device), -coef[:, None]], dim=1
                )
            else:
                x, y = _per_member(kernel.unpack(load_batch(task, train_dataset, rnd.idx.reshape(-1), device)), k)
                w = rnd.weight.to(device=device, dtype=dtype)
            return kernel.grad_and_value(params, x, y, w)

    elif spec.leave_out == "subtract":
        z_single = tree_map(_unsqueeze1, z_j)

        def subtract_loss(p, batch, z, c):
            return fn.loss(p, batch).mean() - c * fn.loss(p, z).sum()

        subtract_grad = vmap(grad_and_value(subtract_loss), in_dims=(0, None, 0, 0))

        def step_grad(rnd: _Round) -> tuple[dict[str, Tensor], Tensor]:
            return subtract_grad(params, load_batch(task, train_dataset, rnd.shared, device), z_single, coef)

    else:

        def weighted_loss(p, batch, w):
            return (fn.loss(p, batch) * w).sum()

        drop_grad = vmap(grad_and_value(weighted_loss), in_dims=(0, 0, 0))

        def step_grad(rnd: _Round) -> tuple[dict[str, Tensor], Tensor]:
            batch = _per_member(load_batch(task, train_dataset, rnd.idx.reshape(-1), device), k)
            return drop_grad(params, batch, rnd.weight.to(device=device, dtype=dtype))

    return step_grad


def _per_member(flat: Any, k: int) -> Any:
    """A batch of ``K·R`` rows as ``K`` batches of ``R`` rows (leading dims ``[K, R]``)."""
    return tree_map(lambda t: t.reshape(k, -1, *t.shape[1:]) if isinstance(t, Tensor) else t, flat)


def _unsqueeze1(t: Any) -> Any:
    return t.unsqueeze(1) if isinstance(t, Tensor) else t


# -- the lockstep schedule -------------------------------------------------------------------------
class _Permutations:
    """``epoch_permutation`` of one seed, cached with its inverse (position of each index)."""

    def __init__(self, seed: int, n: int) -> None:
        self.seed, self.n = seed, n
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, epoch: int) -> tuple[Tensor, Tensor]:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(min(self._cache))
            perm = epoch_permutation(self.seed, epoch, self.n)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(self.n)
            self._cache[epoch] = (perm, inv)
        return self._cache[epoch]


def _rounds(spec: Schedule, seed: int, members: list[int | None]) -> Iterator[_Round]:
    """The rounds of one seed's runs, in order (see :class:`_Round`)."""
    perms = _Permutations(seed, spec.n)
    b = spec.batch_size
    total = spec.total_steps

    def is_checkpoint(step: int, epoch_done: bool) -> bool:
        if spec.eval_every == "epoch":
            return epoch_done
        return step % spec.eval_every == 0 or step == total

    if spec.leave_out == "subtract":
        step = 0
        for epoch in itertools.count():
            chunks = perms(epoch)[0].split(b)
            for r, chunk in enumerate(chunks):
                step += 1
                yield _Round(chunk, None, None, None, is_checkpoint(step, r == len(chunks) - 1))
                if spec.steps is not None and step == total:
                    return
            if spec.epochs is not None and epoch + 1 == spec.epochs:
                return

    j_vec = torch.tensor([j if j is not None else 0 for j in members])
    loo = torch.tensor([j is not None for j in members])
    if spec.epochs is not None:
        rounds = spec.steps_per_epoch(excluded=not bool((~loo).any()))
        step = 0
        for epoch in range(spec.epochs):
            perm, inv = perms(epoch)
            pos = torch.where(loo, inv[j_vec], spec.n)
            for r in range(rounds):
                step += 1
                idx, weight = _drop_rows(perm, r, b, pos)
                active = weight.sum(1) > 0
                yield _Round(None, idx, weight, active, is_checkpoint(step, r == rounds - 1))
        return
    spe = {True: spec.steps_per_epoch(excluded=True), False: spec.steps_per_epoch(excluded=False)}
    for t in range(total):
        idx = torch.empty(len(members), b, dtype=torch.long)
        weight = torch.empty(len(members), b, dtype=torch.float64)
        for excluded in (True, False):
            rows = loo == excluded
            if not bool(rows.any()):
                continue
            perm, inv = perms(t // spe[excluded])
            pos = torch.where(loo[rows], inv[j_vec[rows]], spec.n)
            idx[rows], weight[rows] = _drop_rows(perm, t % spe[excluded], b, pos)
        yield _Round(None, idx, weight, None, is_checkpoint(t + 1, False))


def _drop_rows(perm: Tensor, r: int, b: int, pos: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``[K, b]`` and weights of batch ``r`` of ``perm`` with position ``pos[k]`` removed.

    ``pos[k] = n`` removes nothing (the full run). Row ``q`` of the shortened order is position
    ``q + (q >= pos[k])`` of ``perm``; rows past the end get weight 0 (index clamped to a real row).
    """
    n = perm.numel()
    length = torch.where(pos < n, n - 1, n)
    q = r * b + torch.arange(b)
    valid = q.unsqueeze(0) < length.unsqueeze(1)
    where = q.unsqueeze(0) + (q.unsqueeze(0) >= pos.unsqueeze(1)).long()
    idx = perm[where.clamp(max=n - 1)]
    weight = valid.double() / valid.sum(1, keepdim=True).clamp(min=1)
    return idx, weight
