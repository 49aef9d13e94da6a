"""The paper's tabular model: a d-128-128-out ReLU MLP trained with plain SGD."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...task import SupervisedTask
from .base import ZooModule

__all__ = ["MLP", "PAPER_LEARNING_RATES"]

# SGD learning rates of the final training in the paper (SPEC §5); further training uses 10x smaller.
PAPER_LEARNING_RATES = {"concrete": 0.3, "energy": 0.3, "heloc": 1e-3, "folktables": 1e-2}


class MLP(ZooModule):
    """``input_dim -> 128 -> 128 -> num_outputs`` with ReLU: :attr:`net` is ``nn.Sequential(Linear, ReLU,
    Linear, ReLU, Linear)`` (parameters ``net.0.weight``, ``net.0.bias``, ``net.2.*``, ``net.4.*``).

    ``num_outputs == 1`` is regression with squared error (``SupervisedTask("mse")``: summed over
    outputs, no 1/2 factor; targets ``[B, 1]`` or ``[B]``); more outputs are logits with softmax
    cross-entropy (``SupervisedTask("cross_entropy")``, int64 labels ``[B]``). The training step
    minimises the mean of exactly the per-example loss that attribution differentiates.

    Args:
        input_dim: number of features ``d`` (required; ``fimoda run`` fills a ``null`` from the data).
        num_outputs: 1 (regression) or the number of classes.
        hidden: hidden layer widths (paper: 128, 128).
        lr: SGD learning rate; ``None`` takes the paper's: 0.3 for regression (Concrete, Energy),
            1e-3 for classification (FICO HELOC; Folktables used 1e-2, see ``PAPER_LEARNING_RATES``).
        momentum, weight_decay: SGD settings (paper: 0, 0).
        seed: seed of the weight initialisation (paper: 0); ``None`` uses the global RNG.
    """

    fimoda_sequential = "net"  # forward is exactly self.net: lets further training use its MLP engine

    def __init__(
        self,
        input_dim: int | None = None,
        num_outputs: int = 1,
        hidden: Sequence[int] = (128, 128),
        lr: float | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if input_dim is None:
            raise ValueError(
                "MLP: input_dim is required (in a `fimoda run` config, `input_dim: null` takes it from the "
                "datamodule's input_dim)."
            )
        if input_dim < 1 or num_outputs < 1:
            raise ValueError(f"MLP: input_dim and num_outputs must be positive, got {input_dim}, {num_outputs}.")
        if num_outputs == 1 and lr is None:
            lr = PAPER_LEARNING_RATES["concrete"]
        elif lr is None:
            lr = PAPER_LEARNING_RATES["heloc"]
        self.save_hyperparameters({"input_dim": input_dim, "num_outputs": num_outputs, "hidden": list(hidden),
                                   "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "seed": seed})
        self.loss_kind: Literal["mse", "cross_entropy"] = "mse" if num_outputs == 1 else "cross_entropy"
        widths = [input_dim, *hidden, num_outputs]
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            layers: list[nn.Module] = []
            for a, b in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            self.net = nn.Sequential(*layers[:-1])
        self._attribution_task = SupervisedTask(self.loss_kind)

    @classmethod
    def from_datamodule(cls, datamodule: Any, **kwargs: Any) -> MLP:
        """An MLP sized for ``datamodule`` (its ``input_dim`` and ``num_outputs``)."""
        return cls(input_dim=datamodule.input_dim, num_outputs=datamodule.num_outputs, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def attribution_task(self) -> SupervisedTask:
        """``SupervisedTask("mse")`` for regression, ``SupervisedTask("cross_entropy")`` otherwise."""
        return self._attribution_task

    def class_labels(self, batch: Any) -> Tensor | None:
        return batch[1].reshape(-1) if self.loss_kind == "cross_entropy" else None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
