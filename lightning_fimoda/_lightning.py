"""What ``FiMODACallback`` needs from Lightning: the datasets behind a trainer, and a module's state
saved and restored around attribution."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader

from .exceptions import ConfigurationError

__all__ = ["find_datasets", "preserved_state"]


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Restore ``module`` (modes, grad flags, values, grads, device) and every global RNG on exit."""
    training = {m: m.training for m in module.modules()}
    params = dict(module.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    # copies on the CPU, so that a model on an accelerator does not need twice its memory there
    grads = {n: None if p.grad is None else p.grad.detach().to("cpu", copy=True) for n, p in params.items()}
    values = {n: t.detach().to("cpu", copy=True) for n, t in module.state_dict(keep_vars=True).items()}
    device = next((p.device for p in module.parameters()), None)
    rng = _rng_states()
    try:
        yield
    finally:
        if device is not None:
            module.to(device)
        with torch.no_grad():
            for name, tensor in module.state_dict(keep_vars=True).items():
                if name in values:
                    tensor.copy_(values[name])
        for name, p in params.items():
            p.requires_grad_(flags[name])
            p.grad = None if grads[name] is None else grads[name].to(p.device)
        for m, flag in training.items():
            m.training = flag
        _set_rng_states(rng)


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def _loader_dataset(loaders: Any) -> Any:
    """The dataset behind a dataloader, or behind the only dataloader of a collection."""
    if isinstance(loaders, DataLoader):
        return loaders.dataset
    found = []
    if isinstance(loaders, Mapping):
        found = [v for v in loaders.values() if isinstance(v, DataLoader)]
    elif isinstance(loaders, (list, tuple)):
        found = [v for v in loaders if isinstance(v, DataLoader)]
    return found[0].dataset if len(found) == 1 else None


def _datamodule_dataset(dm: Any, attributes: Sequence[str], hooks: Sequence[str]) -> Any:
    for attr in attributes:
        ds = getattr(dm, attr, None)
        if ds is not None:
            return ds
    for hook in hooks:
        method = getattr(dm, hook, None)
        if callable(method):
            ds = _loader_dataset(_safe(method))
            if ds is not None:
                return ds
    return None


def _trainer_dataset(trainer: Trainer, split: str) -> Any:
    """The dataset of the trainer's ``train`` / ``test`` / ``val`` dataloaders: the loaded ones, or (in
    ``setup()``, before Lightning loads them) the ones passed to ``fit``."""
    loaded = {"train": "train_dataloader", "test": "test_dataloaders", "val": "val_dataloaders"}[split]
    ds = _loader_dataset(_safe(lambda: getattr(trainer, loaded)))
    if ds is None and split in ("train", "val"):
        loop = trainer.fit_loop if split == "train" else trainer.fit_loop.epoch_loop.val_loop
        source = getattr(loop, "_data_source", None)
        ds = _loader_dataset(_safe(source.dataloader)) if source is not None and source.is_defined() else None
    return ds


def find_datasets(trainer: Trainer | None, datamodule: Any, train: Any, test: Any) -> tuple[Any, Any]:
    """``(train_dataset, test_dataset)``: given ones, else the datamodule's ``train_dataset`` /
    ``test_dataset`` (``val_dataset``), else the datasets behind the trainer's dataloaders."""
    dm = datamodule if datamodule is not None else getattr(trainer, "datamodule", None)
    if train is None and dm is not None:
        train = _datamodule_dataset(dm, ["train_dataset"], ["train_dataloader"])
    if train is None and trainer is not None:
        train = _trainer_dataset(trainer, "train")
    if test is None and dm is not None:
        test = _datamodule_dataset(dm, ["test_dataset", "val_dataset"], ["test_dataloader", "val_dataloader"])
    if test is None and trainer is not None:
        test = _trainer_dataset(trainer, "test")
        if test is None:
            test = _trainer_dataset(trainer, "val")
    missing = [name for name, ds in (("train_dataset", train), ("test_dataset", test)) if ds is None]
    if missing:
        raise ConfigurationError(
            f"FiMODACallback could not find the {' and '.join(missing)}: pass it to FiMODACallback(...), "
            "give the datamodule a train_dataset / test_dataset attribute, or fit with a single "
            "train / validation dataloader."
        )
    return train, test


def _safe(get: Any) -> Any:
    try:
        return get()
    except Exception:  # noqa: BLE001 - a trainer property or datamodule hook that is not available yet
        return None
