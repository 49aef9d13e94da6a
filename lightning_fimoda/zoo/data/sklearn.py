"""Embedded datasets that ship with scikit-learn: no download, no file, always available."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.datasets import load_breast_cancer, load_diabetes

from .base import TabularDataModule

__all__ = ["BreastCancerDataModule", "DiabetesDataModule"]


class DiabetesDataModule(TabularDataModule):
    """scikit-learn's diabetes regression data (442 x 10; 397 train / 45 test with the defaults).

    Items ``(x [10], y [1])``; features and (by default) the target standardised with training
    statistics. Keyword arguments: see :class:`~lightning_fimoda.zoo.data.base.TabularDataModule`.
    """

    task_kind = "regression"
    name = "Diabetes"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        data = load_diabetes()
        return data.data.astype(np.float64), data.target.astype(np.float64), list(data.feature_names)


class BreastCancerDataModule(TabularDataModule):
    """scikit-learn's breast cancer binary classification data (569 x 30; 512 train / 57 test).

    Items ``(x [30], y)`` with ``y`` an int64 class id (0 = malignant, 1 = benign, as in scikit-learn).
    Keyword arguments: see :class:`~lightning_fimoda.zoo.data.base.TabularDataModule`.
    """

    task_kind = "classification"
    name = "BreastCancer"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        data = load_breast_cancer()
        self.class_names = [str(c) for c in data.target_names]
        return data.data.astype(np.float64), data.target.astype(np.int64), list(data.feature_names)
