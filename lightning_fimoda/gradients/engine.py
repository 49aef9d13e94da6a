"""Per-sample gradient engine: ``vmap(grad)`` over examples with ``torch.func``, chunked to a budget.

``g_i = ∇_θ ℓ(z_i; θ̂)`` for training examples and ``g_x = ∇_θ f(x; θ̂)`` for test examples, as
``[c, P]`` chunks (:func:`gradient_chunks`, columns in ``named_parameters`` order) or one flat
``[N, P]`` matrix (:func:`per_sample_gradients`) with per-parameter and per-layer views.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from tqdm.auto import tqdm

from .._data import iter_batches, load_batch, model_device_dtype, resolve_indices
from ..exceptions import ConfigurationError, NonFiniteError
from ..functional import FunctionalTask, Params, eval_mode
from ..task import AttributionTask
from .budget import chunk_size_for, itemsize, resolve_memory_budget

__all__ = ["ParameterLayout", "PerSampleGradients", "gradient_chunks", "per_sample_gradients"]

Kind = Literal["loss", "measurement"]
_METHOD = {"loss": "per_example_loss", "measurement": "measurement"}


@dataclass(frozen=True)
class ParameterLayout:
    """Which parameter occupies which columns of a flat ``[*, P]`` gradient."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def num_params(self) -> int:
        """Number of columns ``P``."""
        return sum(s.numel() for s in self.shapes)

    def parameter_slices(self) -> dict[str, slice]:
        """Column range of each parameter."""
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            out[name] = slice(start, start + shape.numel())
            start += shape.numel()
        return out

    def layer_slices(self) -> dict[str, slice]:
        """Column range of each layer (module owning the parameters, e.g. ``fc1``: weight + bias)."""
        out: dict[str, slice] = {}
        for name, sl in self.parameter_slices().items():
            layer = name.rsplit(".", 1)[0] if "." in name else name
            prev = out.get(layer)
            out[layer] = slice(prev.start, sl.stop) if prev is not None else sl
        return out


@dataclass
class PerSampleGradients:
    """Per-example gradients of ``N`` examples over ``P`` selected parameter entries.

    Attributes:
        flat: ``[N, P]`` gradients, columns in ``names`` order.
        names: parameter names, in column order.
        shapes: parameter shapes, in column order.
        indices: ``[N]`` dataset indices of the rows.
    """

    flat: Tensor
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    indices: Tensor

    def __len__(self) -> int:
        return self.flat.shape[0]

    @property
    def num_params(self) -> int:
        """Number of selected parameter entries ``P`` (columns)."""
        return self.flat.shape[1]

    @property
    def layout(self) -> ParameterLayout:
        return ParameterLayout(self.names, self.shapes)

    def parameter_slices(self) -> dict[str, slice]:
        """Column range of each parameter in :attr:`flat`."""
        return self.layout.parameter_slices()

    def blocks(self) -> dict[str, Tensor]:
        """Per-parameter gradients ``{name: [N, *shape]}`` (views of :attr:`flat`)."""
        n = len(self)
        return {
            name: self.flat[:, sl].reshape(n, *shape)
            for (name, sl), shape in zip(self.parameter_slices().items(), self.shapes)
        }

    def layer_slices(self) -> dict[str, slice]:
        """Column range of each layer (module owning the parameters, e.g. ``fc1``: weight + bias)."""
        return self.layout.layer_slices()

    def layer_blocks(self) -> dict[str, Tensor]:
        """Per-layer gradients ``{layer: [N, P_l]}`` (views of :attr:`flat`)."""
        return {layer: self.flat[:, sl] for layer, sl in self.layer_slices().items()}


def _check_task_once(fn: FunctionalTask, method: str, batch: Any, what: str) -> None:
    """Run the task on a real batch first, for clear errors before any vmapped work."""
    try:
        with torch.no_grad():
            values = fn.call(method, fn.params, batch)
    except Exception as err:
        err.add_note(f"(while computing {fn.task!r}.{method} on the {what} dataset)")
        raise
    if not isinstance(values, Tensor):
        raise TypeError(f"{fn.task!r}.{method} returned {type(values).__name__}, expected a Tensor [B].")
    size = _batch_size(batch)
    if values.dim() != 1 or (size is not None and values.shape[0] != size):
        raise ValueError(
            f"{fn.task!r}.{method} returned shape {tuple(values.shape)} for a batch of {size} "
            "examples; expected [B]: one value per example, no reduction over the batch "
            "(use reduction='none')."
        )
    if not torch.isfinite(values).all():
        raise NonFiniteError(f"{fn.task!r}.{method} is not finite on the {what} dataset: {values.tolist()[:8]}")


def _batch_size(batch: Any) -> int | None:
    leaves = torch.utils._pytree.tree_leaves(batch)
    for leaf in leaves:
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None


@dataclass
class _Pass:
    """Everything one pass over the examples needs, validated before any vmapped work."""

    fn: FunctionalTask
    dataset: Any
    method: str
    values: Params
    indices: Tensor
    chunk_size: int
    device: torch.device
    dtype: torch.dtype
    what: str


def _prepare(
    model: nn.Module, task: AttributionTask, dataset: Any, indices: Sequence[int] | Tensor | None, *,
    kind: Kind = "loss", params: Sequence[str] | None = None, at: Params | None = None,
    chunk_size: int | None = None, memory_budget: int | None = None, what: str = "training",
) -> _Pass:
    if kind not in _METHOD:
        raise ConfigurationError(f"kind must be one of {tuple(_METHOD)}, got {kind!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ConfigurationError(f"chunk_size must be >= 1, got {chunk_size!r}.")
    idx = resolve_indices(dataset, indices, what)
    device, dtype = model_device_dtype(model)
    fn = FunctionalTask(model, task, params)
    values = dict(fn.params)
    if at is not None:
        unknown = set(at) - set(values)
        if unknown:
            raise KeyError(f"`at` names parameters that are not selected: {sorted(unknown)}")
        values.update({n: v.detach().to(device) for n, v in at.items()})
    budget = resolve_memory_budget(memory_budget, device)
    size = int(chunk_size) if chunk_size else chunk_size_for(fn.num_params, itemsize(dtype), budget, device)
    with eval_mode(model):
        _check_task_once(fn, _METHOD[kind], load_batch(task, dataset, idx[: min(2, idx.numel())], device), what)
    return _Pass(fn, dataset, _METHOD[kind], values, idx, size, device, dtype, what)


def _run(job: _Pass, progress: bool, out: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(positions [c], gradients [c, P])``; rows are written into ``out`` when given."""
    fn, single = job.fn, job.fn.single(job.method)
    bar = tqdm(total=job.indices.numel(), desc=f"per-sample gradients ({job.what})", disable=not progress)
    start = 0
    for chunk, batch in iter_batches(fn.task, job.dataset, job.indices, job.chunk_size, job.device):
        in_dims = torch.utils._pytree.tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch)
        with eval_mode(fn.model):
            grads = vmap(grad(single), in_dims=(None, in_dims))(job.values, batch)
        c = chunk.numel()
        rows = out[start : start + c] if out is not None else None
        rows = torch.cat([grads[n].reshape(c, -1) for n in fn.names], dim=1, out=rows)
        del grads
        if not torch.isfinite(rows.sum(dim=1)).all():  # any inf/nan entry makes its row sum non-finite
            bad = chunk[~torch.isfinite(rows).all(dim=1).cpu()]
            raise NonFiniteError(
                f"Non-finite per-sample gradients of {job.method} for {job.what} indices {bad[:8].tolist()}."
            )
        yield torch.arange(start, start + c), rows
        start += c
        bar.update(c)
    bar.close()


def gradient_chunks(
    model: nn.Module, task: AttributionTask, dataset: Any, indices: Sequence[int] | Tensor | None = None,
    **options: Any,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Per-example gradients in chunks: yields ``(positions [c], gradients [c, P])``.

    ``positions`` index rows of the ``N`` selected examples (``0 .. N-1``, in ``indices`` order), not
    the dataset. Keyword ``options`` are those of :func:`per_sample_gradients` (``kind``, ``params``,
    ``at``, ``chunk_size``, ``memory_budget``, ``progress``, ``what``); they are checked, and the task
    run once on two examples, when this is called, before the first chunk is computed.
    """
    progress = options.pop("progress", False)
    return _run(_prepare(model, task, dataset, indices, **options), progress)


def per_sample_gradients(
    model: nn.Module,
    task: AttributionTask,
    dataset: Any,
    indices: Sequence[int] | Tensor | None = None,
    *,
    kind: Kind = "loss",
    params: Sequence[str] | None = None,
    at: Params | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
    what: str = "training",
) -> PerSampleGradients:
    """Per-example gradients ``[N, P]`` of the loss (``kind="loss"``) or the measurement ``f``.

    Args:
        model: model in any mode; gradients are taken in eval mode and its flags restored.
        task: the attribution task.
        dataset: map-style dataset; ``indices`` selects items (``None``: all).
        params: parameter names, module names or globs to differentiate (``None``: all trainable;
            see :func:`~lightning_fimoda.functional.select_parameters`).
        at: optional ``{name: value}`` to evaluate the gradients at other parameter values than
            the model's (e.g. ``θ̂ + Δθ`` for the generalized influence function).
        chunk_size: examples per vmapped chunk; default from ``memory_budget`` (bytes for one chunk
            and its intermediates; ``None``: 25% of the memory available now).
        what: dataset name used in error messages.
    """
    job = _prepare(model, task, dataset, indices, kind=kind, params=params, at=at, chunk_size=chunk_size,
                   memory_budget=memory_budget, what=what)
    out = torch.empty(job.indices.numel(), job.fn.num_params, dtype=job.dtype, device=job.device)
    for _ in _run(job, progress, out=out):
        pass
    fn = job.fn
    return PerSampleGradients(
        flat=out, names=tuple(fn.names), shapes=tuple(fn.shapes[n] for n in fn.names), indices=job.indices
    )
