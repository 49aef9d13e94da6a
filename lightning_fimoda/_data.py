"""Dataset plumbing shared by estimators and the gold standard: index checks, batching, devices."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map
from torch.utils.data import Subset, TensorDataset

from .task import AttributionTask


def dataset_length(dataset: Any, what: str) -> int:
    """``len(dataset)`` with a clear error for datasets without a length."""
    try:
        n = len(dataset)
    except TypeError as err:
        raise TypeError(f"The {what} dataset must be a map-style dataset with a length.") from err
    return n


def resolve_indices(dataset: Any, indices: Sequence[int] | Tensor | None, what: str) -> Tensor:
    """Validated dataset indices ``[N]`` (int64, CPU); ``None`` means every item.

    Raises ``ValueError`` for an empty dataset or selection, out-of-range or duplicate indices.
    """
    n = dataset_length(dataset, what)
    if n == 0:
        raise ValueError(f"The {what} dataset is empty.")
    if indices is None:
        return torch.arange(n)
    idx = torch.as_tensor(indices)
    if idx.numel() == 0:
        raise ValueError(f"No {what} indices given: the selection is empty.")
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise TypeError(f"{what} indices must be integers, got dtype {idx.dtype}.")
    idx = idx.reshape(-1).long().cpu()
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.numel():
        raise IndexError(
            f"{what} indices out of range for a dataset of {n} items: {bad[:5].tolist()}"
            + (" ..." if bad.numel() > 5 else "")
        )
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError(f"{what} indices contain duplicates.")
    return idx


def _tensor_columns(dataset: Any, indices: Tensor) -> tuple[Tensor, ...] | None:
    """Batched indexing for (subsets of) ``TensorDataset``: what default collate would give, fast."""
    if isinstance(dataset, Subset):
        return _tensor_columns(dataset.dataset, torch.as_tensor(dataset.indices)[indices])
    if isinstance(dataset, TensorDataset):
        return tuple(t[indices] for t in dataset.tensors)
    return None


def load_batch(task: AttributionTask, dataset: Any, indices: Tensor, device: torch.device) -> Any:
    """Collate ``dataset[i]`` for ``i in indices`` with the task's collate, on ``device``."""
    if type(task).collate is AttributionTask.collate:
        columns = _tensor_columns(dataset, indices)
        if columns is not None:
            return to_device(columns, device)
    items = [dataset[int(i)] for i in indices]
    try:
        batch = task.collate(items)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise TypeError(
            f"{task!r} could not collate dataset items of type {type(items[0]).__name__}: {err}"
        ) from err
    return to_device(batch, device)


def iter_batches(
    task: AttributionTask, dataset: Any, indices: Tensor, batch_size: int, device: torch.device
) -> Iterator[tuple[Tensor, Any]]:
    """Yield ``(indices_chunk, batch)`` over ``indices`` in order, ``batch_size`` at a time."""
    for start in range(0, indices.numel(), batch_size):
        chunk = indices[start : start + batch_size]
        yield chunk, load_batch(task, dataset, chunk, device)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, batch)


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter."""
    for p in model.parameters():
        return p.device, p.dtype
    raise ValueError(f"{type(model).__name__} has no parameters to attribute with.")
