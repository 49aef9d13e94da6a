"""Each estimator's scores saved as soon as they exist, and reused by a rerun of the same experiment.

One file per estimator, ``<directory>/<label>.safetensors`` (the label percent-encoded), holding the
scores ``[n_test, n_train]`` (or ``[n_checkpoints, n_test, n_train]``) and, as JSON metadata, the
run's time, settings, peak memory and its **fingerprint**. The fingerprint is the SHA-256 of

- the estimator's class and its settings as constructed (``settings()`` without the values chosen
  while fitting, i.e. without the keys of ``est.info``),
- the task's ``repr``,
- the model: its class, which parameters are trainable, and its weights and buffers (every
  ``state_dict`` tensor: name, dtype, shape and bytes),
- the training and test indices scored and the two dataset sizes.

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

if TYPE_CHECKING:
    from .estimators.base import Estimator
    from .pipeline import EstimatorRun

__all__ = ["ScoreStore", "fingerprint", "model_digest"]


def model_digest(model: nn.Module) -> str:
    """SHA-256 of the model's class, which parameters are trainable, and every ``state_dict`` tensor
    (name, dtype, shape, bytes)."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, p in model.named_parameters():
        h.update(f"{name}|{p.requires_grad}|".encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(
    est: Estimator, weights: str, task: Any, train_idx: Tensor, test_idx: Tensor, sizes: tuple[int, int]
) -> str:
    """The fingerprint of one estimator's scores (see the module doc); ``weights`` is :func:`model_digest`."""
    info = getattr(est, "info", {}) or {}
    settings = {k: v for k, v in est.settings().items() if k not in info}
    payload = {
        "class": f"{type(est).__module__}.{type(est).__qualname__}",
        "settings": settings,
        "task": repr(task),
        "weights": weights,
        "train_indices": train_idx.tolist(),
        "test_indices": test_idx.tolist(),
        "dataset_sizes": list(sizes),
    }
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
