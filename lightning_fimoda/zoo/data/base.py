"""Shared plumbing for the datamodules: file checks, CSV reading, and the paper's tabular pipeline.

:class:`TabularDataModule` does what every tabular dataset in the paper shares: a
``train_test_split(test_size, random_state)`` of the rows, features standardised with the training
split's mean and standard deviation, the regression target optionally standardised the same way, and
``TensorDataset`` train / test splits whose items are ``(x [d], y)`` — ``y`` a float ``[1]`` for
regression, an int64 scalar class label for classification. Subclasses only implement
:meth:`~TabularDataModule.load_arrays`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["TabularDataModule", "read_table", "require_columns", "require_file"]

TaskKind = Literal["regression", "classification"]


def require_file(path: str | Path, dataset: str, how_to_get: str) -> Path:
    """``path`` as a ``Path`` if it is an existing file, else a ``FileNotFoundError`` saying where to get it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: data file {str(path)!r} not found. {how_to_get}")
    return path


def require_columns(header: Sequence[str], required: Sequence[str], path: Path, dataset: str) -> None:
    """Raise a ``ValueError`` naming the missing columns when ``header`` lacks any of ``required``."""
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(
            f"{dataset}: {str(path)!r} lacks the columns {missing} (found {list(header)}). "
            "Is it the right file, with a header row?"
        )


def read_table(path: Path, delimiter: str = ",") -> tuple[list[str], list[list[str]]]:
    """Header and rows (lists of stripped strings) of a delimited text file; quoting as in ``csv``."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else 0)
        rows = [[cell.strip() for cell in row] for row in reader if row]
    if not rows:
        raise ValueError(f"{str(path)!r} is empty.")
    header, body = rows[0], rows[1:]
    bad = [i + 2 for i, row in enumerate(body) if len(row) != len(header)]
    if bad:
        raise ValueError(
            f"{str(path)!r}: lines {bad[:5]} have a different number of fields than the header "
            f"({len(header)})."
        )
    return header, body


def numeric_columns(
    header: Sequence[str], rows: list[list[str]], columns: Sequence[str], path: Path, dataset: str
) -> np.ndarray:
    """The named columns as a float64 array ``[n_rows, len(columns)]``, with a clear error for text."""
    require_columns(header, columns, path, dataset)
    pos = [header.index(c) for c in columns]
    try:
        return np.array([[float(row[p]) for p in pos] for row in rows], dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{dataset}: {str(path)!r} has a non-numeric value in {list(columns)}: {err}") from err


class SplitDataModule(L.LightningDataModule):
    """Train / test dataloaders from ``_loader(dataset, shuffle)``; the validation loader serves the test
    split (the paper's settings have no separate validation split)."""

    shuffle = True

    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, False)


class TabularDataModule(SplitDataModule):
    """A tabular dataset split, standardised and served as ``TensorDataset`` s (paper preprocessing).

    Args:
        batch_size: mini-batch size of the train / val / test dataloaders (paper: 128).
        test_size: fraction (or number) of rows held out, as in ``sklearn.model_selection.train_test_split``.
        random_state: seed of that split (paper: 0).
        standardize_target: standardise a regression target with the training split's statistics
            (paper: yes for Concrete and Energy); ignored for classification.
        shuffle: shuffle the training dataloader (seeded by ``seed``).
        seed: seed of the training dataloader's shuffling.
        dtype: floating dtype of the features and regression targets (``"float32"`` or ``"float64"``).
        num_workers: dataloader workers.
        max_train, max_test: keep only the first that many rows of each split, taken after the split and
            before standardisation (small CPU runs and tests); ``None`` keeps all.

    After :meth:`setup`: :attr:`train_dataset`, :attr:`test_dataset` (items ``(x [d], y)``),
    :attr:`feature_names`, :attr:`feature_mean` / :attr:`feature_std` ``[d]`` and, for regression,
    :attr:`target_mean` / :attr:`target_std` (``0`` / ``1`` when the target is not standardised).
    :attr:`input_dim`, :attr:`num_outputs` and :attr:`task_kind` load the data on first use, so they
    can wire a model before ``Trainer.fit``.
    """

    task_kind: TaskKind = "regression"
    name = "tabular"

    def __init__(
        self,
        batch_size: int = 128,
        test_size: float | int = 0.1,
        random_state: int = 0,
        standardize_target: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        dtype: Literal["float32", "float64"] = "float32",
        num_workers: int = 0,
        max_train: int | None = None,
        max_test: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        for key, value in (("max_train", max_train), ("max_test", max_test)):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be a positive number of rows or None, got {value}.")
        self.max_train, self.max_test = max_train, max_test
        self.batch_size = batch_size
        self.test_size = test_size
        self.random_state = random_state
        self.standardize_target = standardize_target
        self.shuffle = shuffle
        self.seed = seed
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}.")
        self.dtype = getattr(torch, dtype)
        self.num_workers = num_workers
        self.train_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None
        self.feature_names: list[str] = []
        self.class_names: list[str] = []
        self.numeric_features: list[str] | None = None  # set by load_arrays to standardise only these

    # -- what subclasses provide -------------------------------------------------------------------
    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Features ``[n, d]`` (float), targets ``[n]`` (float for regression, int class ids for
        classification) and the feature names, before splitting. Classification subclasses also set
        :attr:`class_names`; setting :attr:`numeric_features` restricts standardisation to those."""
        raise NotImplementedError

    # -- pipeline ----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        x, y, names = self.load_arrays()
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise ValueError(f"{self.name}: expected features [n, d] and targets [n], got {x.shape}, {y.shape}.")
        self.feature_names = list(names)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=self.test_size, random_state=self.random_state)
        x_tr, y_tr = x_tr[: self.max_train], y_tr[: self.max_train]
        x_te, y_te = x_te[: self.max_test], y_te[: self.max_test]
        scaled = np.ones(x.shape[1], dtype=bool)
        if self.numeric_features is not None:  # dummy-coded columns stay 0/1
            scaled = np.array([n in self.numeric_features for n in self.feature_names])
        std = x_tr.std(axis=0)
        self.feature_mean = np.where(scaled, x_tr.mean(axis=0), 0.0)
        self.feature_std = np.where(scaled & (std > 0), std, 1.0)  # constant columns stay (centred) at zero
        x_tr = (x_tr - self.feature_mean) / self.feature_std
        x_te = (x_te - self.feature_mean) / self.feature_std
        if self.task_kind == "regression":
            self.target_mean, self.target_std = 0.0, 1.0
            if self.standardize_target:
                self.target_mean, self.target_std = float(y_tr.mean()), float(y_tr.std())
            y_tr = torch.as_tensor((y_tr - self.target_mean) / self.target_std, dtype=self.dtype)[:, None]
            y_te = torch.as_tensor((y_te - self.target_mean) / self.target_std, dtype=self.dtype)[:, None]
        else:
            y_tr, y_te = torch.as_tensor(y_tr, dtype=torch.long), torch.as_tensor(y_te, dtype=torch.long)
        self.train_dataset = TensorDataset(torch.as_tensor(x_tr, dtype=self.dtype), y_tr)
        self.test_dataset = TensorDataset(torch.as_tensor(x_te, dtype=self.dtype), y_te)

    @property
    def input_dim(self) -> int:
        """Number of features ``d`` (after encoding)."""
        self.setup()
        return self.train_dataset.tensors[0].shape[1]

    @property
    def num_classes(self) -> int:
        """Number of classes (classification only)."""
        if self.task_kind != "classification":
            raise AttributeError(f"{self.name} is a regression dataset; it has no classes.")
        self.setup()
        return len(self.class_names)

    @property
    def num_outputs(self) -> int:
        """Model outputs: 1 for regression, one logit per class for classification."""
        return 1 if self.task_kind == "regression" else self.num_classes

    # -- dataloaders -------------------------------------------------------------------------------
    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for dataloaders.")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator,
            num_workers=self.num_workers,
        )

