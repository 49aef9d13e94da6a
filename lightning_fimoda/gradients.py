"""Per-sample gradient engine: ``vmap(grad)`` over examples with ``torch.func``, chunked to a budget.

``g_i = ∇_θ ℓ(z_i; θ̂)`` for training examples and ``g_x = ∇_θ f(x; θ̂)`` for test examples, returned
as one flat ``[N, P]`` matrix (columns in ``named_parameters`` order) plus per-parameter and per-layer
views. A :class:`GradientCache` computes each set once per ``attribute()`` call and shares it between
estimators.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from tqdm.auto import tqdm

from ._data import iter_batches, load_batch, model_device_dtype, resolve_indices
from .functional import FunctionalTask, Params, eval_mode
from .task import AttributionTask

__all__ = ["GradientCache", "PerSampleGradients", "per_sample_gradients"]

Kind = Literal["loss", "measurement"]
_METHOD = {"loss": "per_example_loss", "measurement": "measurement"}
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes for one chunk of per-sample gradients and their intermediates
MAX_CHUNK = 1024


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
        return self.flat.shape[1]

    def parameter_slices(self) -> dict[str, slice]:
        """Column range of each parameter in :attr:`flat`."""
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            out[name] = slice(start, start + shape.numel())
            start += shape.numel()
        return out

    def blocks(self) -> dict[str, Tensor]:
        """Per-parameter gradients ``{name: [N, *shape]}`` (views of :attr:`flat`)."""
        n = len(self)
        return {
            name: self.flat[:, sl].reshape(n, *shape)
            for (name, sl), shape in zip(self.parameter_slices().items(), self.shapes)
        }

    def layer_slices(self) -> dict[str, slice]:
        """Column range of each layer (module owning the parameters, e.g. ``fc1``: weight + bias)."""
        out: dict[str, slice] = {}
        for name, sl in self.parameter_slices().items():
            layer = name.rsplit(".", 1)[0] if "." in name else name
            prev = out.get(layer)
            out[layer] = slice(prev.start, sl.stop) if prev is not None else sl
        return out

    def layer_blocks(self) -> dict[str, Tensor]:
        """Per-layer gradients ``{layer: [N, P_l]}`` (views of :attr:`flat`)."""
        return {layer: self.flat[:, sl] for layer, sl in self.layer_slices().items()}


def _chunk_size(num_params: int, itemsize: int, budget: int) -> int:
    per_example = max(1, num_params * itemsize * 4)  # gradient + vmap intermediates, rough
    return int(max(1, min(MAX_CHUNK, budget // per_example)))


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
        raise FloatingPointError(
            f"{fn.task!r}.{method} is not finite on the {what} dataset: {values.tolist()[:8]}"
        )


def _batch_size(batch: Any) -> int | None:
    leaves = torch.utils._pytree.tree_leaves(batch)
    for leaf in leaves:
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None


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
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    what: str = "training",
) -> PerSampleGradients:
    """Per-example gradients ``[N, P]`` of the loss (``kind="loss"``) or the measurement ``f``.

    Args:
        model: model in any mode; gradients are taken in eval mode and its flags restored.
        task: the attribution task.
        dataset: map-style dataset; ``indices`` selects items (``None``: all).
        params: parameter / module names to differentiate (``None``: all trainable).
        at: optional ``{name: value}`` to evaluate the gradients at other parameter values than
            the model's (e.g. ``θ̂ + Δθ`` for the generalized influence function).
        chunk_size: examples per vmapped chunk; default from ``memory_budget`` (bytes).
        what: dataset name used in error messages.
    """
    if kind not in _METHOD:
        raise ValueError(f"kind must be one of {tuple(_METHOD)}, got {kind!r}.")
    idx = resolve_indices(dataset, indices, what)
    device, dtype = model_device_dtype(model)
    method = _METHOD[kind]
    with eval_mode(model):
        fn = FunctionalTask(model, task, params)
        values = dict(fn.params)
        if at is not None:
            unknown = set(at) - set(values)
            if unknown:
                raise KeyError(f"`at` names parameters that are not selected: {sorted(unknown)}")
            values.update({n: v.detach().to(device) for n, v in at.items()})
        size = chunk_size or _chunk_size(fn.num_params, torch.finfo(dtype).bits // 8, memory_budget)
        _check_task_once(fn, method, load_batch(task, dataset, idx[: min(2, idx.numel())], device), what)
        single = fn.single(method)
        out = torch.empty(idx.numel(), fn.num_params, dtype=dtype, device=device)
        batches = iter_batches(task, dataset, idx, size, device)
        bar = tqdm(total=idx.numel(), desc=f"per-sample gradients ({what})", disable=not progress)
        row = 0
        for chunk, batch in batches:
            in_dims = torch.utils._pytree.tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch)
            grads = vmap(grad(single), in_dims=(None, in_dims))(values, batch)
            rows = out[row : row + chunk.numel()]
            torch.cat([grads[n].reshape(chunk.numel(), -1) for n in fn.names], dim=1, out=rows)
            if not torch.isfinite(rows.sum(dim=1)).all():  # any inf/nan entry makes its row sum non-finite
                bad = chunk[~torch.isfinite(rows).all(dim=1).cpu()]
                raise FloatingPointError(
                    f"Non-finite per-sample gradients of {method} for {what} indices {bad[:8].tolist()}."
                )
            row += chunk.numel()
            bar.update(chunk.numel())
        bar.close()
    return PerSampleGradients(
        flat=out, names=tuple(fn.names), shapes=tuple(fn.shapes[n] for n in fn.names), indices=idx
    )


class GradientCache:
    """Computes each set of per-sample gradients once and hands it to every estimator that asks.

    Keys are (model, task, dataset, indices, kind, parameter selection); entries live as long as the
    cache (one ``attribute()`` call). Gradients at shifted parameters (``at=``) are not cached.
    """

    def __init__(self, memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: bool = False) -> None:
        self.memory_budget = memory_budget
        self.progress = progress
        self._store: dict[tuple, PerSampleGradients] = {}
        self._refs: list[Any] = []  # keeps keyed objects alive so their ids stay unique
        self.computed = 0  # number of gradient sets actually computed (for tests and reports)

    def get(
        self,
        model: nn.Module,
        task: AttributionTask,
        dataset: Any,
        indices: Tensor,
        *,
        kind: Kind = "loss",
        params: Sequence[str] | None = None,
        what: str = "training",
    ) -> PerSampleGradients:
        digest = hashlib.sha1(indices.cpu().numpy().tobytes()).hexdigest()
        key = (id(model), id(task), id(dataset), digest, kind, tuple(params) if params else None)
        if key not in self._store:
            self._store[key] = per_sample_gradients(
                model, task, dataset, indices, kind=kind, params=params,
                memory_budget=self.memory_budget, progress=self.progress, what=what,
            )
            self._refs.extend([model, task, dataset])
            self.computed += 1
        return self._store[key]

    def clear(self) -> None:
        self._store.clear()
        self._refs.clear()
