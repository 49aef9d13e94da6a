"""CIFAR-10 from a local ``.npz`` file or through torchvision."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset, default_collate

from ..._optional import require
from .base import SplitDataModule

__all__ = ["CIFAR10DataModule", "RandomCropFlip"]

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class RandomCropFlip:
    """Collate with the usual CIFAR augmentation: random ``size`` crop of the image zero-padded by
    ``padding`` pixels, then a horizontal flip with probability 1/2; seeded by ``generator``."""

    def __init__(self, padding: int = 4, generator: torch.Generator | None = None) -> None:
        self.padding = padding
        self.generator = generator

    def __call__(self, items: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        x, y = default_collate(list(items))
        b, _, h, w = x.shape
        p = self.padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dx = torch.randint(0, 2 * p + 1, (b,), generator=self.generator).tolist()
        dy = torch.randint(0, 2 * p + 1, (b,), generator=self.generator).tolist()
        flip = torch.rand(b, generator=self.generator) < 0.5
        out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
        out[flip] = out[flip].flip(-1)
        return out, y


class CIFAR10DataModule(SplitDataModule):
    """CIFAR-10 images ``(x [3, 32, 32], y)``, standardised per channel with training statistics.

    Sources, in order: ``path`` (an ``.npz`` with uint8 ``x_train [N, 32, 32, 3]``, int ``y_train``,
    ``x_test``, ``y_test``); else ``data_dir / "cifar10_subset.npz"`` if it exists; else torchvision's
    CIFAR-10 under ``data_dir`` (downloaded there when ``download=True``).

    Args:
        batch_size: dataloader batch size (paper: 512).
        augment: random crop (padding 4) + horizontal flip in the training dataloader only (paper:
            yes); :attr:`train_dataset` itself is never augmented, so attribution sees fixed images.
        max_train, max_test: keep only the first that many images of each split (small CPU runs).
        shuffle, seed: training dataloader shuffling and augmentation seed.
        dtype: ``"float32"`` or ``"float64"``.
    """

    task_kind = "classification"
    name = "CIFAR-10"
    npz_name = "cifar10_subset.npz"
    input_dim = (3, 32, 32)
    num_outputs = num_classes = len(CLASSES)

    def __init__(
        self,
        data_dir: str | Path = "data",
        path: str | Path | None = None,
        download: bool = False,
        batch_size: int = 512,
        augment: bool = True,
        max_train: int | None = None,
        max_test: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        dtype: Literal["float32", "float64"] = "float32",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}.")
        self.data_dir = Path(data_dir)
        self.path = Path(path) if path is not None else None
        self.download = download
        self.batch_size = batch_size
        self.augment = augment
        self.max_train = max_train
        self.max_test = max_test
        self.shuffle = shuffle
        self.seed = seed
        self.dtype = getattr(torch, dtype)
        self.num_workers = num_workers
        self.class_names = list(CLASSES)
        self.train_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """uint8 images ``[N, 32, 32, 3]`` and int labels ``[N]`` of the train and test splits."""
        path = self.path or self.data_dir / self.npz_name
        if self.path is not None or path.is_file():
            return self._load_npz(path)
        datasets = require("torchvision.datasets", "CIFAR-10 without a local .npz (torchvision)")
        try:
            train = datasets.CIFAR10(str(self.data_dir), train=True, download=self.download)
            test = datasets.CIFAR10(str(self.data_dir), train=False, download=self.download)
        except (RuntimeError, OSError) as err:  # not found / corrupted, or no network for the download
            raise FileNotFoundError(
                f"CIFAR-10: neither {str(path)!r} nor torchvision's CIFAR-10 under {str(self.data_dir)!r} "
                "found. Pass path= to an .npz with x_train/y_train/x_test/y_test, or download=True to fetch "
                f"it from https://www.cs.toronto.edu/~kriz/cifar.html with torchvision ({err})."
            ) from err
        return train.data, np.asarray(train.targets), test.data, np.asarray(test.targets)

    def _load_npz(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-10: {str(path)!r} not found. Pass path= to an .npz with uint8 x_train [N, 32, 32, 3], "
                "y_train, x_test, y_test, or use download=True (torchvision, "
                "https://www.cs.toronto.edu/~kriz/cifar.html)."
            )
        with np.load(path) as data:
            missing = [k for k in NPZ_KEYS if k not in data.files]
            if missing:
                raise ValueError(f"CIFAR-10: {str(path)!r} lacks the arrays {missing} (has {data.files}).")
            arrays = tuple(data[k] for k in NPZ_KEYS)
        for name, images in (("x_train", arrays[0]), ("x_test", arrays[2])):
            if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
                raise ValueError(f"CIFAR-10: {name} in {str(path)!r} has shape {images.shape}, expected [N, 32, 32, 3].")
        return arrays

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        x_tr, y_tr, x_te, y_te = self.load_arrays()
        x_tr, y_tr = x_tr[: self.max_train], y_tr[: self.max_train]
        x_te, y_te = x_te[: self.max_test], y_te[: self.max_test]
        x_tr = torch.as_tensor(x_tr).permute(0, 3, 1, 2).to(torch.float64) / 255.0
        x_te = torch.as_tensor(x_te).permute(0, 3, 1, 2).to(torch.float64) / 255.0
        self.channel_mean = x_tr.mean(dim=(0, 2, 3), keepdim=True)[0]  # [3, 1, 1]
        self.channel_std = x_tr.std(dim=(0, 2, 3), keepdim=True)[0]
        x_tr = ((x_tr - self.channel_mean) / self.channel_std).to(self.dtype)
        x_te = ((x_te - self.channel_mean) / self.channel_std).to(self.dtype)
        self.train_dataset = TensorDataset(x_tr, torch.as_tensor(y_tr, dtype=torch.long))
        self.test_dataset = TensorDataset(x_te, torch.as_tensor(y_te, dtype=torch.long))

    def _loader(self, dataset: Any, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("CIFAR10DataModule: call setup() before asking for dataloaders.")
        shuffle = train and self.shuffle
        generator = torch.Generator().manual_seed(self.seed)
        collate = RandomCropFlip(generator=torch.Generator().manual_seed(self.seed + 1)) if train and self.augment else None
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator if shuffle else None,
            collate_fn=collate, num_workers=self.num_workers,
        )

