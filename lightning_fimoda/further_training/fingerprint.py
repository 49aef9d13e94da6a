"""Content fingerprint of a further-training job: what decides its numbers, and nothing else.

A fingerprint is a flat ``{component: value}`` dict (JSON); two jobs whose fingerprints are equal
produce the same units, so a run directory (or another rank) may share them. Components:

- ``further_training``: the :class:`FurtherTrainingConfig` settings; ``n_train``, ``loo_indices``,
  ``test_indices``;
- ``model_architecture``: hash of the module tree (``repr`` of every module, the source of every
  non-``torch`` module class) and of the parameter / buffer names, shapes, dtypes and trainability;
- ``model_digest``: hash of the weights and buffers (bytes, on the CPU);
- ``task``: hash of the task's class, its source (and its bases'), and its attributes, or of the
  value of its own ``fingerprint()`` method when it defines one;
- ``train_digest`` / ``test_digest``: streaming hash of every item read (every training item, the
  measured test items); tensors are hashed as raw bytes (fast path for ``TensorDataset`` and its
  ``Subset``), other values by type and content;
- ``versions``: the torch version (its kernels decide the last bits).

Not in it: engine, chunking, memory budget, device, progress — a run may move to a GPU and resume.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._data import _tensor_columns, dataset_length
from ..task import AttributionTask

__all__ = ["differences", "fingerprint_id", "job_fingerprint", "model_digest"]

_TORCH_MODULES = ("torch.", "lightning.", "pytorch_lightning.")


def job_fingerprint(
    settings: dict[str, Any],
    model: nn.Module,
    task: AttributionTask,
    train_dataset: Any,
    test_dataset: Any,
    loo_indices: Tensor,
    test_indices: Tensor,
) -> dict[str, Any]:
    """The fingerprint of one job (see the module docstring)."""
    return {
        "further_training": settings,
        "n_train": dataset_length(train_dataset, "training"),
        "loo_indices": loo_indices.tolist(),
        "test_indices": test_indices.tolist(),
        "model_architecture": model_architecture(model),
        "model_digest": model_digest(model),
        "task": task_digest(task),
        "train_digest": dataset_digest(train_dataset),
        "test_digest": dataset_digest(test_dataset, test_indices),
        "versions": {"torch": torch.__version__.split("+")[0]},
    }


def fingerprint_id(fingerprint: dict[str, Any]) -> str:
    """A short hash of a whole fingerprint (stored with every unit)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:20]


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The components whose values differ (sorted)."""
    return sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))


def model_architecture(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"{name}:{module.extra_repr()}:{_class_source(type(module))}".encode())
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            h.update(f"{kind} {name} {tuple(t.shape)} {t.dtype} {t.requires_grad}".encode())
    return h.hexdigest()[:20]


def model_digest(model: nn.Module) -> str:
    """Hash of every weight and buffer (values and dtypes; device-independent)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _feed(h, t)
    return h.hexdigest()[:20]


def task_digest(task: AttributionTask) -> str:
    own = getattr(task, "fingerprint", None)
    h = hashlib.sha256()
    if callable(own):
        h.update(f"{type(task).__qualname__}:{own()!r}".encode())
        return h.hexdigest()[:20]
    for cls in type(task).__mro__:
        if cls is not object:
            h.update(_class_source(cls).encode())
    for key, value in sorted(vars(task).items()):
        h.update(key.encode())
        _feed(h, value)
    return h.hexdigest()[:20]


def dataset_digest(dataset: Any, indices: Tensor | None = None) -> str:
    """Streaming hash of the items ``indices`` (default: all) of a map-style dataset."""
    n = dataset_length(dataset, "dataset")
    idx = torch.arange(n) if indices is None else indices
    h = hashlib.sha256(f"{idx.numel()} items".encode())
    columns = _tensor_columns(dataset, idx)
    if columns is not None:
        for column in columns:
            _feed(h, column)
        return h.hexdigest()[:20]
    for i in idx.tolist():
        _feed(h, dataset[i])
    return h.hexdigest()[:20]


def _class_source(cls: type) -> str:
    if cls.__module__.startswith(_TORCH_MODULES) or cls.__module__ == "builtins":
        return f"{cls.__module__}.{cls.__qualname__}"
    try:
        return f"{cls.__qualname__}:{inspect.getsource(cls)}"
    except (OSError, TypeError):
        return f"{cls.__module__}.{cls.__qualname__}"


def _feed(h: Any, value: Any, depth: int = 0) -> None:
    """Add ``value``'s type and content to the hash ``h`` (nested containers walked)."""
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _feed(h, v, depth + 1)
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _feed(h, value[k], depth + 1)
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        h.update(repr(value).encode())
    elif callable(value) and hasattr(value, "__code__"):  # functions: by their source
        try:
            h.update(inspect.getsource(value).encode())
        except (OSError, TypeError):
            h.update(value.__code__.co_code)
    elif hasattr(value, "tobytes"):  # PIL images and the like
        h.update(f"B{type(value).__qualname__}".encode())
        h.update(value.tobytes())
    elif hasattr(value, "__dict__") and depth < 4:
        h.update(_class_source(type(value)).encode())
        _feed(h, dict(vars(value)), depth + 1)
    else:
        h.update(f"{type(value).__qualname__}:{value!r}".encode())
