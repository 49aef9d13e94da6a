"""The Lightning plumbing the zoo models share: train, validate and test on the attribution loss."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor

from ...task import AttributionTask

__all__ = ["ZooModule"]


class ZooModule(L.LightningModule):
    """A LightningModule whose steps minimise the mean of exactly the per-example loss that attribution
    differentiates (``attribution_task().per_example_loss``), logging ``<stage>_loss`` and, for
    classifiers, ``<stage>_acc``.

    Subclasses set ``self._attribution_task`` (returned by their ``attribution_task()``) and override :meth:`class_labels` when they classify.
    """

    _attribution_task: AttributionTask

    def class_labels(self, batch: Any) -> Tensor | None:
        """Integer labels ``[B]`` of a classification batch; ``None`` (no accuracy) for regression."""
        return None

    def _step(self, batch: Any, stage: str) -> Tensor:
        outputs = self._attribution_task.outputs(self, batch)
        loss = self._attribution_task.loss_from_outputs(outputs, batch).mean()
        labels = self.class_labels(batch)
        size = None if labels is None else labels.shape[0]
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train", batch_size=size)
        if labels is not None:
            acc = (outputs.argmax(dim=1) == labels).float().mean()
            self.log(f"{stage}_acc", acc, prog_bar=stage != "train", batch_size=size)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")
