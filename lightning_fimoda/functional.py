"""A model + task evaluated at explicit parameter values, for ``torch.func`` transforms.

:class:`FunctionalTask` is the bridge every fast path uses (per-sample gradients, Hessian-vector
products, batched leave-one-out training): it calls the task's methods with the model's parameters
replaced by given tensors (``torch.func.functional_call``), so they can be differentiated, vmapped
over examples, or vmapped over stacked parameter sets.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from .exceptions import ConfigurationError
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


def select_parameters(model: nn.Module, selection: Sequence[str] | str | None = None) -> list[str]:
    """Names of the trainable parameters to attribute over, in ``named_parameters`` order.

    Each entry of ``selection`` is a parameter name (``"fc2.weight"``), a module name (``"fc2"``: all
    its parameters, those of submodules included) or an ``fnmatch`` glob matched against parameter
    and module names (``"encoder.layer.5.*"``, ``"fc*"``, ``"*.bias"``); ``None`` selects every
    trainable parameter. An entry that matches nothing raises :class:`ConfigurationError` listing the
    modules that own trainable parameters.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigurationError(f"{type(model).__name__} has no trainable parameters (requires_grad=True).")
    if selection is None:
        return trainable
    if isinstance(selection, str):
        selection = [selection]
    chosen: set[str] = set()
    for sel in selection:
        if not isinstance(sel, str) or not sel:
            raise ConfigurationError(f"Parameter selections must be non-empty strings, got {sel!r}.")
        hits = [n for n in trainable if _selects(sel, n)]
        if not hits:
            raise ConfigurationError(
                f"Parameter selection {sel!r} matches no trainable parameter. "
                f"Trainable modules: {_listing(_owner_modules(trainable))}; parameters: {_listing(trainable)}."
            )
        chosen.update(hits)
    return [n for n in trainable if n in chosen]


def _selects(sel: str, name: str) -> bool:
    """Whether selection ``sel`` (name, module name or glob) covers parameter ``name``."""
    if name == sel or name.startswith(sel + "."):
        return True
    if not any(c in sel for c in "*?["):
        return False
    parts = name.split(".")
    prefixes = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]  # modules owning it, and itself
    return any(fnmatch.fnmatchcase(p, sel) for p in prefixes)


def _owner_modules(names: list[str]) -> list[str]:
    return list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names if "." in n))


def _listing(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names) - limit} more)' if len(names) > limit else ''}]"


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


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Full float32 matrix products and convolutions inside the block (TF32 off), restored afterwards.

    On Ampere+ GPUs torch lets cuDNN convolutions use TF32 (~1e-3 relative precision) by default: more
    than a leave-one-out effect (~1/n). No effect on CPUs.
    """
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        torch.set_float32_matmul_precision(precision)


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
