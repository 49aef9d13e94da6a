"""Attribution tasks: the one place that knows how to turn a batch into numbers.

An :class:`AttributionTask` tells every estimator and the further-training gold standard how to get,
from a model and a collated batch of ``B`` examples,

- the per-example training loss ``ℓ(z; θ)`` — shape ``[B]``;
- the measurement ``f(x; θ)`` on test examples — shape ``[B]`` (default: the per-example loss);
- for Gauss-Newton methods, the model outputs ``[B, O]``, the loss as a function of those outputs and
  its Hessian in them (:meth:`~AttributionTask.output_hessian`, ``[B, O, O]``; autodiff by default);
- for TRAK, the model output function per example (:meth:`~AttributionTask.model_output`, ``[B]``).

:class:`SupervisedTask` covers ``(x, y)`` batches. For other batches (dicts, Hugging Face text),
subclass :class:`AttributionTask` and override :meth:`~AttributionTask.outputs` and
:meth:`~AttributionTask.loss_from_outputs` (or :meth:`~AttributionTask.per_example_loss` directly).

A ``LightningModule`` supplies its own task by defining a method ``attribution_task()`` that returns
one; :func:`resolve_task` (used by ``FiMODACallback``) prefers an explicitly given task, then that method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import hessian, vmap
from torch.utils._pytree import tree_map
from torch.utils.data import default_collate

__all__ = ["AttributionTask", "SupervisedTask", "margin", "resolve_task"]


class AttributionTask:
    """How to compute per-example numbers from a batch. Subclass for your own batch layout.

    Every method receives the model and a collated batch of ``B`` examples and must not reduce over
    the batch: per-example methods return ``[B]`` tensors. Methods are called both on real batches and,
    inside ``torch.func.vmap``, on batches of one example, so they must be written with batched tensor
    operations only (no ``.item()``, no Python branching on values).
    """

    def outputs(self, model: nn.Module, batch: Any) -> Tensor:
        """Model outputs ``[B, O]`` whose Hessian-of-loss defines the Gauss-Newton matrix."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define outputs(); Gauss-Newton methods need it. "
            "Override outputs() and loss_from_outputs(), or use hessian='exact'."
        )

    def loss_from_outputs(self, outputs: Tensor, batch: Any) -> Tensor:
        """Per-example training loss ``[B]`` as a function of the outputs of :meth:`outputs`."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define loss_from_outputs(); override it, or override "
            "per_example_loss() directly."
        )

    def per_example_loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Per-example training loss ``ℓ(z; θ)``, shape ``[B]`` (no reduction over the batch)."""
        return self.loss_from_outputs(self.outputs(model, batch), batch)

    def output_hessian(self, outputs: Tensor, batch: Any) -> Tensor:
        """``∇²_o ℓ`` per example ``[B, O, O]`` at ``outputs`` ``[B, O]``.

        Default: ``torch.func.hessian`` of :meth:`loss_from_outputs`, vmapped over examples; override
        with a closed form when there is one (as :class:`SupervisedTask` does).
        """

        def loss_one(o: Tensor, example: Any) -> Tensor:
            one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
            return self.loss_from_outputs(o.unsqueeze(0), one)[0]

        in_dims = tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch)
        return vmap(hessian(loss_one), in_dims=(0, in_dims))(outputs, batch)

    def model_output(self, model: nn.Module, batch: Any) -> Tensor:
        """TRAK's model output function ``F(z; θ)`` per example, shape ``[B]``.

        TRAK assumes the loss is a convex function of ``F``; for softmax classification use the
        margin ``o_y − logsumexp_{c≠y} o_c`` (:func:`margin`), for scalar regression the prediction.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not define model_output(); TRAK needs it: return the margin "
            "(lightning_fimoda.task.margin(logits, labels)) for classification, the prediction for regression."
        )

    def measurement(self, model: nn.Module, batch: Any) -> Tensor:
        """Evaluation function ``f(x; θ)`` per test example, shape ``[B]``; default: the loss."""
        return self.per_example_loss(model, batch)

    def collate(self, items: Sequence[Any]) -> Any:
        """Turn a list of dataset items into a batch (default: ``torch.utils.data.default_collate``)."""
        return default_collate(list(items))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SupervisedTask(AttributionTask):
    """Task for ``(x, y)`` batches with the model called as ``model(x)``.

    Args:
        loss: ``"mse"`` — squared error summed over output dimensions, **without** a 1/2 factor
            (output Hessian ``2I``); ``"cross_entropy"`` — softmax cross-entropy on logits ``[B, C]``
            with integer labels ``[B]`` (output Hessian ``diag(p) − ppᵀ``).
    """

    LOSSES = ("mse", "cross_entropy")

    def __init__(self, loss: Literal["mse", "cross_entropy"] = "mse") -> None:
        if loss not in self.LOSSES:
            raise ValueError(f"SupervisedTask: unknown loss {loss!r}; choose one of {self.LOSSES}.")
        self.loss = loss

    @staticmethod
    def unpack(batch: Any) -> tuple[Tensor, Tensor]:
        """Split a batch into ``(x, y)``, with a clear error for any other layout."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        described = type(batch).__name__
        if isinstance(batch, (tuple, list)):
            described += f" of length {len(batch)}"
        elif isinstance(batch, dict):
            described += f" with keys {sorted(batch)}"
        raise TypeError(
            f"SupervisedTask expects dataset items / batches of the form (x, y), got a {described}. "
            "Subclass lightning_fimoda.AttributionTask for other batch layouts."
        )

    def outputs(self, model: nn.Module, batch: Any) -> Tensor:
        x, _ = self.unpack(batch)
        out = model(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"SupervisedTask: model(x) returned {type(out).__name__}, expected a Tensor.")
        return out.reshape(out.shape[0], -1) if out.dim() != 2 else out

    def loss_from_outputs(self, outputs: Tensor, batch: Any) -> Tensor:
        _, y = self.unpack(batch)
        if self.loss == "mse":
            target = y.reshape(outputs.shape[0], -1).to(outputs.dtype)
            if target.shape != outputs.shape:
                raise ValueError(
                    f"SupervisedTask(mse): outputs have shape {tuple(outputs.shape)} but targets "
                    f"{tuple(y.shape)}; they must have the same number of values per example."
                )
            return (outputs - target).pow(2).sum(dim=1)
        return F.cross_entropy(outputs, y.long().reshape(-1), reduction="none")

    def model_output(self, model: nn.Module, batch: Any) -> Tensor:
        """Cross-entropy: the margin ``o_y − logsumexp_{c≠y} o_c``; MSE: the scalar prediction."""
        outputs = self.outputs(model, batch)
        if self.loss == "cross_entropy":
            return margin(outputs, self.unpack(batch)[1])
        if outputs.shape[1] != 1:
            raise ValueError(
                f"SupervisedTask(mse): TRAK's model output is the prediction, which needs one output per "
                f"example; the model gives {outputs.shape[1]}."
            )
        return outputs[:, 0]

    def output_hessian(self, outputs: Tensor, batch: Any) -> Tensor:
        """Closed-form Hessian of the per-example loss in the outputs, ``[B, O, O]``."""
        b, o = outputs.shape
        if self.loss == "mse":
            eye = torch.eye(o, dtype=outputs.dtype, device=outputs.device)
            return 2.0 * eye.expand(b, o, o)
        p = outputs.softmax(dim=1)
        return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)

    def __repr__(self) -> str:
        return f"SupervisedTask(loss={self.loss!r})"


def margin(logits: Tensor, labels: Tensor) -> Tensor:
    """``o_y − logsumexp_{c≠y} o_c`` per example ``[B]`` from logits ``[B, C]`` and labels ``[B]``.

    vmap-safe: an ``arange(C) == y`` mask instead of ``F.one_hot`` or in-place writes.
    """
    is_label = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0) == labels.reshape(-1, 1).long()
    correct = (logits * is_label).sum(dim=1)
    others = torch.where(is_label, torch.full_like(logits, float("-inf")), logits).logsumexp(dim=1)
    return correct - others


def resolve_task(module: nn.Module, task: AttributionTask | None = None) -> AttributionTask:
    """The task to use for ``module``: ``task`` if given, else ``module.attribution_task()``."""
    if task is not None:
        if not isinstance(task, AttributionTask):
            raise TypeError(f"task must be an AttributionTask, got {type(task).__name__}.")
        return task
    factory = getattr(module, "attribution_task", None)
    if callable(factory):
        found = factory()
        if not isinstance(found, AttributionTask):
            raise TypeError(
                f"{type(module).__name__}.attribution_task() returned {type(found).__name__}, "
                "expected an AttributionTask."
            )
        return found
    raise ValueError(
        f"No attribution task for {type(module).__name__}: pass task=SupervisedTask(...) (or your own "
        "AttributionTask subclass), or define an attribution_task() method on the module."
    )
