"""Checks of a further-training job: cheap ones before any work, finiteness as values are produced.

- :func:`check_model` — precision (float16 / bfloat16 refused with :class:`PrecisionError`: the
  leave-one-out differences, ~1e-4 of ``f``, are below half precision's resolution), the meta device,
  and finite weights (:class:`NonFiniteError` naming the parameters);
- :func:`check_task_shapes` — the task's per-example loss and measurement return ``[B]`` on two
  training / test examples (a mean-reduced loss gets the "use reduction='none'" advice);
- :func:`check_data_finite` — every floating tensor of the training items and of the measured test
  items is finite (:class:`NonFiniteError` naming the first bad items);
- :func:`check_loss_finite` / :func:`check_measurements_finite` — during training, at every step and
  checkpoint, naming the seed, step, run and test indices.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .._data import _tensor_columns, load_batch
from ..exceptions import ConfigurationError, NonFiniteError, PrecisionError
from ..functional import eval_mode
from ..task import AttributionTask

__all__ = [
    "check_data_finite",
    "check_loss_finite",
    "check_measurements_finite",
    "check_model",
    "check_task_shapes",
]

_HALF = (torch.float16, torch.bfloat16)


def check_model(model: nn.Module) -> None:
    """Refuse half precision, the meta device and non-finite weights or buffers."""
    tensors = dict(model.named_parameters())
    if not tensors:
        raise ConfigurationError(f"{type(model).__name__} has no parameters to train further.")
    meta = [n for n, t in tensors.items() if t.is_meta]
    if meta:
        raise PrecisionError(
            f"Parameters {meta[:5]} are on the meta device (no values); load real weights before the gold "
            "standard."
        )
    half = [n for n, t in tensors.items() if t.dtype in _HALF]
    if half:
        raise PrecisionError(
            f"Parameters {half[:5]} are {tensors[half[0]].dtype}: leave-one-out differences (~1e-4 of f) are "
            "below half precision's resolution, so the gold standard would be noise. Convert the model "
            "with model.float() (or .double()) before further training."
        )
    bad = [n for n, t in {**tensors, **dict(model.named_buffers())}.items() if t.is_floating_point()
           and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(
            f"The model's weights are not finite (NaN/inf in {bad[:5]}): the original training diverged; "
            "further training cannot start from these weights."
        )


def check_task_shapes(
    model: nn.Module, task: AttributionTask, train: Any, test: Any, test_index: int, device: torch.device
) -> None:
    """The task's ``per_example_loss`` and ``measurement`` return one value per example."""
    with torch.no_grad(), eval_mode(model):
        for method, dataset, idx, what in (
            ("per_example_loss", train, [0, 1], "training"),
            ("measurement", test, [test_index], "test"),
        ):
            batch = load_batch(task, dataset, torch.tensor(idx), device)
            try:
                values = getattr(task, method)(model, batch)
            except Exception as err:
                err.add_note(f"(while computing {task!r}.{method} on {len(idx)} {what} examples)")
                raise
            if not isinstance(values, Tensor) or values.dim() != 1 or values.shape[0] != len(idx):
                got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
                raise ConfigurationError(
                    f"{task!r}.{method} returned {got} for a batch of {len(idx)} {what} examples; expected "
                    f"[{len(idx)}]: one value per example, no reduction over the batch (use reduction='none')."
                )


def check_data_finite(dataset: Any, indices: Tensor, what: str) -> None:
    """Every floating tensor in items ``indices`` of ``dataset`` is finite."""
    columns = _tensor_columns(dataset, indices)
    bad: list[int] = []
    if columns is not None:
        rows = torch.zeros(indices.numel(), dtype=torch.bool)
        for col in columns:
            if col.is_floating_point() or col.is_complex():
                rows |= ~torch.isfinite(col.reshape(col.shape[0], -1)).all(1)
        bad = indices[rows].tolist()
    else:
        for i in indices.tolist():
            leaves = [t for t in tree_leaves(dataset[i]) if isinstance(t, Tensor) and t.is_floating_point()]
            if any(not bool(torch.isfinite(t).all()) for t in leaves):
                bad.append(i)
                if len(bad) >= 5:
                    break
    if bad:
        raise NonFiniteError(
            f"The {what} data is not finite: items {bad[:5]} hold NaN or inf. Clean the data; further "
            "training on it would give non-finite weights (this is not a learning-rate problem)."
        )


def _run_name(member: int | None) -> str:
    return "the full run" if member is None else f"the run leaving out training index {member}"


def check_loss_finite(
    loss: Tensor, active: Tensor | None, seed: int, step: int, members: list[int | None]
) -> None:
    """Raise at the first non-finite loss ``[K]`` of the active members."""
    bad = ~torch.isfinite(loss.reshape(-1))
    if active is not None:
        bad &= active.to(bad.device)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise NonFiniteError(
            f"Non-finite further-training loss ({loss.reshape(-1)[k].item()}) at seed {seed}, step {step}, "
            f"in {_run_name(members[k])}. The data and starting weights were checked finite: lower lr or "
            "set grad_clip."
        )


def check_measurements_finite(
    values: Tensor, seed: int, step: int, members: list[int | None], test_indices: Tensor | None
) -> None:
    """Raise when a measurement ``values [n_test, K]`` is not finite, naming test indices and run."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        rows, cols = bad.nonzero(as_tuple=True)
        tests = rows.unique().tolist()
        if test_indices is not None:
            tests = test_indices[rows.unique().cpu()].tolist()
        raise NonFiniteError(
            f"Non-finite measurement f(x) for test indices {tests[:5]} at seed {seed}, step {step}, in "
            f"{_run_name(members[int(cols[0])])}; nothing of it is stored."
        )
