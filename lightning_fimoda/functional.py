"""A model + task evaluated at explicit parameter values, for ``torch.func`` transforms.

:class:`FunctionalTask` is the bridge every fast path uses (per-sample gradients, Hessian-vector
products, batched leave-one-out training): it calls the task's methods with the model's parameters
replaced by given tensors (``torch.func.functional_call``), so they can be differentiated, vmapped
over examples, or vmapped over stacked parameter sets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from .task import AttributionTask

__all__ = ["FunctionalTask", "eval_mode", "select_parameters"]

Params = dict[str, Tensor]


class _TaskCall(nn.Module):
    """Wraps ``model`` so that ``functional_call`` reparametrises it while a task method runs."""

    def __init__(self, task: AttributionTask, model: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, method: str, batch: Any) -> Tensor:
        if method == "loss_from_outputs":
            raise ValueError("loss_from_outputs does not take the model; call the task directly.")
        return getattr(self.task, method)(self.model, batch)


def select_parameters(model: nn.Module, selection: Sequence[str] | None = None) -> list[str]:
    """Names of the trainable parameters to attribute over, in ``named_parameters`` order.

    ``selection`` holds parameter names or module names (a module selects all its parameters, e.g.
    ``["fc2"]`` selects ``fc2.weight`` and ``fc2.bias``); ``None`` selects every trainable parameter.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True).")
    if selection is None:
        return trainable
    if isinstance(selection, str):
        selection = [selection]
    chosen: list[str] = []
    for sel in selection:
        hits = [n for n in trainable if n == sel or n.startswith(sel + ".")]
        if not hits:
            modules = sorted({n.rsplit(".", 1)[0] for n in trainable if "." in n})
            raise ValueError(
                f"Parameter selection {sel!r} matches no trainable parameter. "
                f"Trainable modules: {modules}; parameters: {trainable}."
            )
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in trainable if n in chosen]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode (dropout off) and restore each one's flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags.items():
            module.training = flag


class FunctionalTask:
    """``task`` on ``model`` as pure functions of the selected parameters.

    Args:
        model: the final model; its current values are ``θ̂`` (:attr:`params`).
        task: how to turn batches into numbers.
        selection: parameters to differentiate (see :func:`select_parameters`); the rest and all
            buffers are held fixed at their current values.
    """

    def __init__(
        self, model: nn.Module, task: AttributionTask, selection: Sequence[str] | None = None
    ) -> None:
        self.model = model
        self.task = task
        self.names = select_parameters(model, selection)
        self._call = _TaskCall(task, model)
        named = dict(model.named_parameters())
        self.params: Params = {n: named[n].detach() for n in self.names}
        self.shapes = {n: p.shape for n, p in self.params.items()}
        fixed = {n: p.detach() for n, p in named.items() if n not in self.params}
        fixed.update({n: b for n, b in model.named_buffers()})
        self._fixed = {"model." + n: v for n, v in fixed.items()}

    @property
    def num_params(self) -> int:
        """Number of selected parameter entries ``P``."""
        return sum(p.numel() for p in self.params.values())

    def call(self, method: str, params: Params, batch: Any) -> Tensor:
        """``task.<method>(model, batch)`` with the selected parameters set to ``params``."""
        state = {"model." + n: v for n, v in params.items()}
        return functional_call(self._call, (state, self._fixed), (method, batch))

    def loss(self, params: Params, batch: Any) -> Tensor:
        """Per-example training loss ``[B]`` at ``params``."""
        return self.call("per_example_loss", params, batch)

    def measurement(self, params: Params, batch: Any) -> Tensor:
        """Per-example measurement ``f`` ``[B]`` at ``params``."""
        return self.call("measurement", params, batch)

    def outputs(self, params: Params, batch: Any) -> Tensor:
        """Model outputs ``[B, O]`` at ``params``."""
        return self.call("outputs", params, batch)

    def single(self, method: str) -> Any:
        """``fn(params, example) -> scalar`` for one un-batched example, for ``vmap`` over examples."""

        def fn(params: Params, example: Any) -> Tensor:
            batch = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
            value = self.call(method, params, batch)
            if value.dim() != 1 or value.shape[0] != 1:
                raise ValueError(
                    f"{self.task!r}.{method} returned shape {tuple(value.shape)} for a batch of 1 "
                    "example; expected [B] (one value per example, no reduction over the batch)."
                )
            return value[0]

        return fn

    # -- flat-vector helpers ------------------------------------------------------------------
    def flatten(self, params: Params) -> Tensor:
        """Concatenate a parameter dict (optionally with leading batch dims) into ``[..., P]``."""
        first = params[self.names[0]]
        lead = first.shape[: first.dim() - len(self.shapes[self.names[0]])]
        return torch.cat([params[n].reshape(*lead, -1) for n in self.names], dim=-1)

    def unflatten(self, flat: Tensor) -> Params:
        """Split ``[..., P]`` back into a parameter dict with the same leading dims."""
        out, start = {}, 0
        lead = flat.shape[:-1]
        for n in self.names:
            size = self.shapes[n].numel()
            out[n] = flat[..., start : start + size].reshape(*lead, *self.shapes[n])
            start += size
        return out
