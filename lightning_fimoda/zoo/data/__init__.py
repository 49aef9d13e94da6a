"""LightningDataModules for the paper's datasets and two embedded defaults.

Every datamodule exposes, after ``setup()``, map-style ``train_dataset`` / ``test_dataset``, and
``task_kind`` (``"regression"`` / ``"classification"``), ``input_dim`` and ``num_outputs`` to wire a
model; ``val_dataloader()`` serves the test split. Tabular and image items are ``(x, y)`` pairs;
text items are dicts (see :mod:`lightning_fimoda.zoo.data.text`).
"""

from .base import TabularDataModule
from .sklearn import BreastCancerDataModule, DiabetesDataModule
from .text import PadCollate, SST2DataModule, TokenizedDataset
from .uci import (
    AdultDataModule,
    ConcreteDataModule,
    EnergyDataModule,
    FolktablesDataModule,
    HELOCDataModule,
)
from .vision import CIFAR10DataModule

__all__ = [
    "AdultDataModule",
    "BreastCancerDataModule",
    "CIFAR10DataModule",
    "ConcreteDataModule",
    "DiabetesDataModule",
    "EnergyDataModule",
    "FolktablesDataModule",
    "HELOCDataModule",
    "PadCollate",
    "SST2DataModule",
    "TabularDataModule",
    "TokenizedDataset",
]
