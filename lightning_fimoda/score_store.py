"""Each estimator's scores saved as soon as they exist, and reused by a rerun of the same experiment.

One file per estimator, ``<directory>/<label>.safetensors`` (the label percent-encoded), holding the
scores ``[n_test, n_train]`` (or ``[n_checkpoints, n_test, n_train]``) and, as JSON metadata, the
run's time, settings, peak memory and its **fingerprint**. The fingerprint is the SHA-256 of

- the estimator's class and its settings as constructed (``settings()`` without the values chosen
  while fitting, i.e. without the keys of ``est.info``),
- the task (its classes' source and attributes, or its own ``fingerprint()``),
- the model: its architecture (module tree, custom classes' source, which parameters are trainable)
  and its weights and buffers,
- the contents of every training item (the curvature and DataInf use all of them) and of the scored
  test items, the scored training indices, and the torch version
(the hashes of :mod:`lightning_fimoda.fingerprint`, shared with the gold standard's run directories).

A saved file is reused only when its fingerprint equals the one computed now; anything else (a
changed damping, retrained weights, other indices) recomputes and overwrites it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ._files import atomic_write
from ._jsonable import jsonable
from .fingerprint import dataset_digest, model_architecture, model_digest, task_digest

if TYPE_CHECKING:
    from .estimators.base import Estimator
    from .pipeline import EstimatorRun

__all__ = ["ScoreStore", "experiment_digest", "fingerprint"]


def experiment_digest(model: nn.Module, task: Any, train_dataset: Any, test_dataset: Any, train_idx: Tensor,
                      test_idx: Tensor) -> dict[str, Any]:
    """What every estimator of one attribution shares in its fingerprint (hashed once)."""
    return {
        "task": task_digest(task),
        "model_architecture": model_architecture(model),
        "model_digest": model_digest(model),
        "train_digest": dataset_digest(train_dataset),
        "test_digest": dataset_digest(test_dataset, test_idx),
        "train_indices": train_idx.tolist(),
        "versions": torch.__version__.split("+")[0],
    }


def fingerprint(est: Estimator, experiment: dict[str, Any]) -> str:
    """The fingerprint of one estimator's scores (see the module doc); ``experiment`` is
    :func:`experiment_digest`."""
    info = getattr(est, "info", {}) or {}
    settings = {k: v for k, v in est.settings().items() if k not in info}
    payload = {"class": f"{type(est).__module__}.{type(est).__qualname__}", "settings": settings, **experiment}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()


class ScoreStore:
    """Saved estimator scores under ``directory`` (see the module doc)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path(self, label: str) -> Path:
        return self.directory / f"{quote(label, safe='')}.safetensors"

    def save(self, run: EstimatorRun, key: str) -> Path:
        """Write ``run``'s scores and metadata with fingerprint ``key`` (atomically)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "fingerprint": key,
            "label": run.label,
            "seconds": run.seconds,
            "settings": jsonable(run.settings),
            "peak_memory": run.peak_memory,
            "checkpoint_indexed": run.checkpoint_indexed,
        }
        path = self.path(run.label)
        tensors = {"scores": run.scores.contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"fimoda": json.dumps(meta)}))
        return path

    def load(self, label: str, key: str) -> EstimatorRun | None:
        """The saved run of ``label`` if its fingerprint is ``key``, else ``None``."""
        from .pipeline import EstimatorRun

        path = self.path(label)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads(fh.metadata()["fimoda"])
        except Exception:  # noqa: BLE001 - an unreadable file is recomputed, not trusted
            return None
        if meta.get("fingerprint") != key:
            return None
        return EstimatorRun(
            label, load_file(str(path))["scores"], float(meta["seconds"]), meta["settings"], meta["peak_memory"],
            checkpoint_indexed=bool(meta["checkpoint_indexed"]), reused=True,
        )
