"""A tiny float64 LightningModule and DataModule for callback, logger, plugin and CLI tests."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fimoda import SupervisedTask


class TinyRegressor(LightningModule):
    """4-6-1 tanh MLP with dropout (so eval mode matters), MSE, SGD; provides its attribution task."""

    def __init__(self, hidden: int = 6, lr: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        gen = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Dropout(0.1), nn.Linear(hidden, 1)).double()
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def attribution_task(self) -> SupervisedTask:
        return SupervisedTask("mse")

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self(x).squeeze(-1) - y).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", (self(x).squeeze(-1) - y).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def regression_data(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = x.sum(dim=1) * 0.5 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    return TensorDataset(x, y)


class TinyDataModule(LightningDataModule):
    """30 training and 8 test examples; exposes ``train_dataset`` / ``test_dataset`` after setup."""

    def __init__(self, n_train: int = 30, n_test: int = 8, batch_size: int = 8) -> None:
        super().__init__()
        self.n_train, self.n_test, self.batch_size = n_train, n_test, batch_size

    def setup(self, stage: str | None = None) -> None:
        self.train_dataset = regression_data(self.n_train, seed=1)
        self.test_dataset = regression_data(self.n_test, seed=2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)


def quiet_trainer(**kwargs) -> Trainer:
    """A CPU trainer without progress bars, model summary or checkpoints."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)
