"""The fingerprint of a further-training job: what defines its numbers (see
:mod:`lightning_fimoda.fingerprint` for how models, tasks and data are hashed).

- ``further_training``: the :class:`FurtherTrainingConfig` settings; ``n_train``, ``loo_indices``,
  ``test_indices``;
- ``model_architecture``, ``model_digest`` (weights and buffers), ``task``, ``train_digest`` /
  ``test_digest`` (every training item, the measured test items);
- ``versions``: the torch version (its kernels decide the last bits).

Not in it: engine, chunking, memory budget, device, progress — a run may move to a GPU and resume.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor, nn

from .._data import dataset_length
from ..fingerprint import dataset_digest, model_architecture, model_digest, task_digest
from ..task import AttributionTask

__all__ = ["differences", "fingerprint_id", "job_fingerprint"]


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


