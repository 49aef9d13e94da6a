"""ResNet-9 for CIFAR-10 (the fast "DAWNBench" ResNet of Page, 2018), trained with SGD as in the paper."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...task import SupervisedTask
from .base import ZooModule

__all__ = ["ResNet9"]


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """3x3 convolution (no bias) -> BatchNorm -> ReLU, optionally followed by 2x2 max pooling."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=False),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """``x + block(x)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class ResNet9(ZooModule):
    """ResNet-9: prep(64) -> conv(128)+pool + residual(128, 128) -> conv(256)+pool -> conv(512)+pool +
    residual(512, 512) -> global max pool -> linear, logits scaled by ``0.125``.

    Images ``[B, 3, H, W]`` (32 x 32 for CIFAR-10), int64 labels, softmax cross-entropy. BatchNorm
    uses batch statistics while training; attribution runs in eval mode (running statistics, no
    dependence between the examples of a batch), so per-example gradients are well defined.

    Args:
        num_classes: outputs (CIFAR-10: 10).
        channels: widths of the four stages (standard: 64, 128, 256, 512; smaller for quick tests).
        lr, momentum, weight_decay, nesterov: SGD (paper: lr 0.4, weight decay 1e-3, batch 512;
            momentum 0.9 with Nesterov as in the standard recipe).
        lr_schedule: ``"triangular"`` (linear warm-up to ``lr`` over the first ``warmup`` fraction of
            the steps, then linear decay to 0: the standard ResNet-9 schedule) or ``"constant"``.
        seed: seed of the weight initialisation (paper: 0); ``None`` uses the global RNG.
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: Sequence[int] = (64, 128, 256, 512),
        in_channels: int = 3,
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-3,
        nesterov: bool = True,
        lr_schedule: str = "triangular",
        warmup: float = 0.2,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"ResNet9: channels needs the 4 stage widths, got {channels}.")
        if lr_schedule not in ("triangular", "constant"):
            raise ValueError(f"ResNet9: lr_schedule must be 'triangular' or 'constant', got {lr_schedule!r}.")
        self.save_hyperparameters({
            "num_classes": num_classes, "channels": list(channels), "in_channels": in_channels, "lr": lr,
            "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov,
            "lr_schedule": lr_schedule, "warmup": warmup, "seed": seed,
        })
        c1, c2, c3, c4 = channels
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.prep = conv_bn(in_channels, c1)
            self.layer1 = nn.Sequential(conv_bn(c1, c2, pool=True), Residual(nn.Sequential(conv_bn(c2, c2), conv_bn(c2, c2))))
            self.layer2 = conv_bn(c2, c3, pool=True)
            self.layer3 = nn.Sequential(conv_bn(c3, c4, pool=True), Residual(nn.Sequential(conv_bn(c4, c4), conv_bn(c4, c4))))
            self.pool = nn.AdaptiveMaxPool2d(1)
            self.fc = nn.Linear(c4, num_classes, bias=False)
        self.scale = 0.125
        self._attribution_task = SupervisedTask("cross_entropy")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(self.pool(x).flatten(1)) * self.scale

    def attribution_task(self) -> SupervisedTask:
        """Softmax cross-entropy on ``(image, label)`` batches."""
        return self._attribution_task

    def class_labels(self, batch: Any) -> Tensor:
        return batch[1]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
            nesterov=hp.nesterov and hp.momentum > 0,
        )
        if hp.lr_schedule == "constant":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        peak = max(1, int(hp.warmup * total))

        def factor(step: int) -> float:
            if step < peak:
                return (step + 1) / peak
            return max(0.0, (total - step) / max(1, total - peak))

        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
